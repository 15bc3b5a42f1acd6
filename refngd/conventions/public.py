"""Presets for widely used public natural-gradient code, derived by reading it.

Four implementations that people validate their own code against, or run as they are:

* ``"kfac-pytorch"`` — the ``kfac-pytorch`` package (github.com/gpauloski/kfac-pytorch),
  K-FAC with the eigen and inverse methods;
* ``"alecwangcq"`` — the hook-based ``KFAC-Pytorch`` repository
  (github.com/alecwangcq/KFAC-Pytorch), K-FAC and EKFAC;
* ``"ekfac-pytorch"`` — the ``EKFAC-pytorch`` repository (github.com/Thrandis/EKFAC-pytorch),
  K-FAC and EKFAC preconditioners;
* ``"ief-authors"`` — the iEF code of Wu et al. (2024)
  (github.com/HANDSOMEJACKANDY/improved-empirical-fisher), ``generalPurposeiEFOptimiser``.

Each :class:`~refngd.conventions.Convention` below was derived from the file and commit
named in its ``sources`` (facts and formulas only; none of their code is in refngd) and is
tested against synthetic candidates written to that convention by hand
(tests/test_conventions_public.py); none of the four is run here.  This module holds the
fields only; :mod:`refngd.conventions` makes them :class:`~refngd.conventions.Convention`
records (so that this module imports nothing of refngd).  Every preset describes
*one batch* — what the code's statistics are for the batch it just saw — and names the
state a training run adds on top (running averages, update clipping, momentum) and how
to switch it off to compare; docs/conventions.md derives every scalar.  They join the one
registry :data:`refngd.conventions.PRESETS`.
"""
from __future__ import annotations

__all__ = ["PUBLIC_PRESETS"]

_TESTED = "tested against synthetic candidates written to it, tests/test_conventions_public.py"

KFAC_PYTORCH_COMMIT = "869cf110334e5a6e9ea054bafdc4558313a821e8"
ALECWANGCQ_COMMIT = "25e6dbe14752348d4f6030697b4b7f553ead2e92"
EKFAC_PYTORCH_COMMIT = "2de112a5c4138b2ddfba352ddec6e4b059ebb0d2"
IEF_COMMIT = "7b83132003aefe4171c7d69675a4f03497ad41b7"

#: the fields of each preset's Convention, in registry order
PUBLIC_PRESETS = (
    dict(
        name="kfac-pytorch",
        library=f"kfac-pytorch (gpauloski/kfac-pytorch @ {KFAC_PYTORCH_COMMIT[:10]})",
        factor_scale="kfac-pytorch", status="transcribed", verified_by=_TESTED,
        options=(("fisher_type", "empirical"), ("bias", "joint"), ("kfac_approx", "expand"),
                 ("damping_mode", "tikhonov")),
        differences=(
            "Factors from the hooks of the user's own backward pass: the observed labels "
            "(fisher_type='empirical'; nothing is sampled) and the gradient of the *reduced* "
            "loss at each layer's output, c·b_n, not refngd's per-sample b_n.",
            "Linear (any leading axes, T positions; T = 1 for a dense layer): A = refngd's "
            "(joint ones column, averaged over the N·T rows); G = (1/(N·T)) Σ (c·b)(c·b)ᵀ = "
            "c/(N·T) × refngd's expand G — 1/N² for a mean cross-entropy (factors from "
            "already-averaged gradients).",
            "Conv2d: patches and the ones column divided by T before the average over N·T "
            "rows, A = refngd's A/T²; grad_output divided by T, G = c/(N·T³) × refngd's G "
            "(1/(N²T³) for a mean cross-entropy). Product: c/(N·T⁵) × refngd's block. Its "
            "patches ignore dilation and groups (dilation=1, groups=1 only).",
            "Bias: joint ([W | b] with ā = [a; 1]); pass bias='joint'.",
            "Eigen method (default): (G ⊗ A + λI)⁻¹ through the eigendecompositions, "
            "eigenvalues clamped at 0 — damping_mode='tikhonov' on these factors. Inverse "
            "method: (G + λI)⁻¹ ⊗ (A + λI)⁻¹, λ on each factor — damping_mode='per-factor' "
            "with one λ. refngd's λ for the same update is λ itself: the factors, not λ, are "
            "scaled, so its damping is relatively ~N²T⁵ larger than refngd's at equal λ.",
            "Both methods decompose / invert in float32 (inv_dtype=torch.float32 and an "
            "explicit .to(torch.float32)): a float64 model's update agrees to float32 "
            "accuracy only — pass rtol=1e-4.",
            "Outside refngd (switch off to compare one batch): the running average "
            "factor_decay (0.95) starts from the identity, so the first step's factor is "
            "0.95·I + 0.05·A — set factor_decay=0 to hold this batch's factors; KL clipping "
            "scales the update by min(1, √(κ/|lr² Σ v·g|)) — kl_clip=None; "
            "accumulation_steps averages several mini-batches; the step itself is the "
            "user's optimizer.",
        ),
        sources=(f"kfac/layers/modules.py (get_a_factor, get_g_factor) @ {KFAC_PYTORCH_COMMIT}",
                 f"kfac/layers/utils.py (get_cov, append_bias_ones) @ {KFAC_PYTORCH_COMMIT}",
                 f"kfac/layers/base.py (update_a_factor, update_g_factor) @ {KFAC_PYTORCH_COMMIT}",
                 f"kfac/layers/eigen.py, kfac/layers/inverse.py @ {KFAC_PYTORCH_COMMIT}",
                 f"kfac/base_preconditioner.py (step, _compute_grad_scale) @ "
                 f"{KFAC_PYTORCH_COMMIT}")),
    dict(
        name="alecwangcq",
        library=f"KFAC-Pytorch (alecwangcq/KFAC-Pytorch @ {ALECWANGCQ_COMMIT[:10]})",
        factor_scale="alecwangcq", status="transcribed", verified_by=_TESTED,
        options=(("fisher_type", "mc"), ("bias", "joint"), ("kfac_approx", "expand"),
                 ("damping_mode", "tikhonov")),
        differences=(
            "G from a second backward pass of CrossEntropyLoss at one label per sample drawn "
            "from the model's softmax (main.py): fisher_type='mc' with mc_samples=1 — pass "
            "its draws as labels= for an exact comparison. The update preconditions the "
            "gradient of the observed labels.",
            "grad_output is multiplied by N (batch_averaged=True): Linear G = N·c × refngd's "
            "(1 for the mean cross-entropy it is written for); A = refngd's, joint ones "
            "column.",
            "Conv2d: patch rows (ones column included) divided by T, A = refngd's A/T; "
            "G rows multiplied by N·T and averaged over N·T, G = N·c·T × refngd's. The "
            "product G ⊗ A is refngd's expand K-FAC block: a factor T moved from A to G. "
            "Its patches ignore dilation and groups.",
            "Bias: joint; pass bias='joint'. Linear layers on sequences are not supported "
            "by its hooks (2-D inputs only).",
            "Damping: (G ⊗ A + λI)⁻¹ through the eigendecompositions (eigenvalues below "
            "1e-10 set to 0) — damping_mode='tikhonov'.",
            "EKFAC (optimizers/ekfac.py): its first step uses K-FAC's eigenvalue products "
            "(the same update as its K-FAC: validate kfac_update). Later steps re-estimate "
            "the diagonal as Q_G · ∇W_n · Q_Aᵀ squared — the basis applied untransposed, so "
            "the result depends on the signs and order eigh returns — mixed into a running "
            "average with the K-FAC eigenvalues: not expressible in refngd.",
            "Outside refngd: the running average stat_decay (0.95) starts from the "
            "identity (first factor 0.95·I + 0.05·A; stat_decay=0 holds this batch's "
            "factors); statistics every TCov steps, eigendecompositions every TInv; "
            "KL clipping min(1, √(κ/(lr² Σ v·g))) (no switch: take the update before "
            "_kl_clip_and_update_grad); SGD momentum and weight decay after.",
        ),
        sources=(f"utils/kfac_utils.py (ComputeCovA, ComputeCovG, update_running_stat) @ "
                 f"{ALECWANGCQ_COMMIT}",
                 f"optimizers/kfac.py (_update_inv, _get_natural_grad) @ {ALECWANGCQ_COMMIT}",
                 f"optimizers/ekfac.py (_update_scale) @ {ALECWANGCQ_COMMIT}",
                 f"main.py (sampled_y, loss_sample.backward) @ {ALECWANGCQ_COMMIT}")),
    dict(
        name="ekfac-pytorch",
        library=f"EKFAC-pytorch (Thrandis/EKFAC-pytorch @ {EKFAC_PYTORCH_COMMIT[:10]})",
        factor_scale="ekfac-pytorch", status="transcribed", verified_by=_TESTED,
        options=(("fisher_type", "empirical"), ("bias", "joint"), ("kfac_approx", "expand"),
                 ("damping_mode", "factored"), ("pi", 1.0), ("damping_split", "locations")),
        differences=(
            "A preconditioner of whatever the user back-propagates: with the README's "
            "criterion(outputs, targets) the empirical Fisher (fisher_type='empirical').",
            "grad_output is multiplied by N and every factor averaged over its N·T rows: "
            "A = refngd's expand A (joint ones column; pass bias='joint'); the stored ggt is "
            "N·c/T × refngd's G (N·c = 1 for a mean cross-entropy). _precond divides the "
            "update by T, so the block it inverts is T·ggt ⊗ xxt = N·c × refngd's: the "
            "preset's G is T·ggt — compare {'<layer>.G': T·ggt}. Its patches (F.unfold, a "
            "gathering filter in EKFAC) ignore dilation.",
            "K-FAC damping: λ/T split over the stored factors, xxt + π√(λ/T) I and "
            "ggt + √(λ/T)/π I, then the factor 1/T; in refngd's factors that is factored "
            "damping with damping_split='locations'. pi=False (default): π = 1 (pass "
            "pi=1.0); pi=True: the trace-norm π from xxt and ggt (pass pi='trace'; the split "
            "then cancels).",
            "EKFAC (ra=False, alpha=1; the default alpha=0.75 without ra=True raises): "
            "eigenbases of xxt and ggt, diagonal (1/N) Σ_n (Q_Gᵀ N·∇W_n Q_A)² over the true "
            "per-sample gradients — refngd's EKFAC diagonal times N·c, the scalar of the "
            "preset's K-FAC block, which the preset's EKFAC applies too — and λ added to "
            "it: damping_mode='tikhonov'.",
            "EKFAC with ra=True re-estimates the diagonal from the squared *mean* gradient "
            "(a running average of N·(Q_Gᵀ ∇W Q_A)² started at T·(eigenvalue products)): "
            "not expressible in refngd, except alpha=1, which keeps K-FAC's eigenvalues — "
            "the K-FAC update with damping_mode='tikhonov'. sua=True (the SUA "
            "approximation of a convolution) is not expressible either.",
            "Outside refngd: alpha < 1 (K-FAC) is a running average started at the first "
            "batch; update_freq reuses older factors; constraint_norm=True scales the "
            "update by 1/√(Σ v·g); the step is the user's optimizer.",
        ),
        sources=(f"kfac.py (KFAC._compute_covs, _inv_covs, _precond, _save_grad_output) @ "
                 f"{EKFAC_PYTORCH_COMMIT}",
                 f"ekfac.py (EKFAC._compute_kfe, _precond_intra, _precond_ra) @ "
                 f"{EKFAC_PYTORCH_COMMIT}")),
    dict(
        name="ief-authors",
        library=f"iEF code of Wu et al. 2024 (HANDSOMEJACKANDY/improved-empirical-fisher @ "
                f"{IEF_COMMIT[:10]})",
        gram_rows="c*g_n", per_sample="c*g_n", status="transcribed", verified_by=_TESTED,
        options=(("form", "gram"),),
        differences=(
            "Rows of the reduced loss: the training loop back-propagates the model's mean "
            "loss, so the per-sample gradients J_n it collects are c·g_n (1/N for a mean "
            "cross-entropy) and the logit gradients ‖c·e_n‖.",
            "opt_flag 'iEFlg2' (the configs' GPiEFlg2, the paper's iEF): "
            "Jᵀ(JJᵀ + λI)⁻¹ t with t_n = ‖c·e_n‖², i.e. c × refngd's Gram-form iEF at "
            "damping λ/c² (N²λ for a mean cross-entropy); 'iEF0' is EF with t = 1: (1/c) × "
            "refngd's Gram-form EF at λ/c². 'iEF2' weights by the parameter-gradient "
            "norms ‖c·g_n‖²: not refngd's iEF.",
            "damping = 1 keeps only diag(JJᵀ) and damping < 0 uses |damping|·max diag(JJᵀ): "
            "neither is λI (compute the λ it amounts to and pass that).",
            "Rows whose gradients have |cosine| > 0.99 are dropped (the larger norm kept) "
            "before the solve: refngd keeps every sample; a batch with near-parallel "
            "per-sample gradients differs. max_samples / mean_truncate (off in the configs) "
            "merge the smallest-norm rows into one: not expressible.",
            "J and JJᵀ are formed in float32 (the solve in float64): a float64 model agrees "
            "to float32 accuracy — pass rtol=1e-4. Conv2d layers with a trainable bias are "
            "refused by its per-sample code.",
            "Outside refngd: momentum on the update, lr (50 in the ViT config, the 1/N of "
            "the rows taken into the learning rate), clip_norm / norm_update and line "
            "search; with accumulate_steps > 1 one step stacks the rows of several "
            "mini-batches, each of its own mean loss (validate one mini-batch).",
        ),
        sources=(f"iEFOptimizer_GP.py (compute_Jacobian, update_logits_grad, step) @ {IEF_COMMIT}",
                 f"example_glue_sst2_train.py (CE_grad, logits.backward) @ {IEF_COMMIT}",
                 f"configs/vit-lora-iEF.yaml (opt_type GPiEFlg2, damping 1e-12) @ {IEF_COMMIT}")),
)

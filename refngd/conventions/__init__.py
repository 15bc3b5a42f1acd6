"""Named conventions: what other curvature libraries compute, reproduced by name.

refngd's default (``"refngd"``, docs/conventions.md) fixes one answer to each question on
which libraries differ: the loss constant c, the MSE's factor 2, per-sample gradients with
or without c, K-FAC's Conv2d scaling, how the bias enters, how factored damping treats a
bias block.  A :class:`Convention` records another library's answers, so that

    KFAC(model, theta, loss, X, y, convention="backpack")

returns BackPACK's numbers, and ``describe("backpack")`` lists every difference.  The
mechanism is deliberately thin: a convention only (i) rescales the loss constant c by a
factor α (the library's objective is α × PyTorch's loss; everything carrying c scales
with it), (ii) selects per-layer K-FAC factor rules — or per-layer scalars on refngd's
factors that leave the gradient alone (``factor_scale``), (iii) selects the damping of a
separate bias block, (iv) transforms per-sample gradients, and (v) selects the rows of
the EF/iEF Gram form (``gram_rows``).  It never changes refngd's own defaults; the
options a preset's code uses (``fisher_type``, ``bias``, ``damping_mode``, …) are listed
in ``Convention.options`` and passed explicitly.

Each preset says whether it is *verified* (a test runs the installed library and
matches it to 1e-10 in float64, tests/test_conventions_libraries.py) or *transcribed*
(read from the library's source and documentation; not run here).  The presets of
public research code (:mod:`refngd.conventions.public`: kfac-pytorch, alecwangcq's
KFAC-Pytorch, EKFAC-pytorch, the iEF authors' code) are transcribed from a cited commit
and tested against synthetic candidates written to the derived convention
(tests/test_conventions_public.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..options import FACTOR_SCALE, GRAM_ROW

__all__ = ["Convention", "get", "names", "describe", "per_sample_gradients", "PRESETS"]


@dataclass(frozen=True)
class Convention:
    """One library's answers to the questions on which curvature libraries differ.

    Attributes
    ----------
    name, library : preset name and the library (with the version it was established on).
    loss_scale : ``"one"`` (the PyTorch loss with its reduction, c as refngd), or
        ``"per-example-mean"`` (1/N Σ_n, whatever the loss's reduction; the MSE's model a
        Gaussian of variance 1, i.e. ½‖z − y‖², for the Fisher), ``"sum-half-mse"`` (Σ_n,
        MSE as ½‖z − y‖²) or ``"batch-mean"`` (1/N Σ_n of PyTorch's per-sample loss).
    per_sample : ``"g_n"`` (refngd: gradients of the unreduced losses) or ``"c*g_n"``
        (gradients of each sample's term of the reduced loss).
    conv_kfac : ``"refngd"`` (``expand`` / ``reduce`` as Eschenhagen et al. 2023) or
        ``"backpack"`` (G of ``reduce``, T·A of ``expand``, T output locations).
    kfac_factors : ``"fisher"`` (the chosen Fisher type's rows) or ``"tutorial"`` (the
        simplified K-FAC from the aggregated weight gradient ∇W: G = ∇W∇Wᵀ/d_out,
        A = ∇Wᵀ∇W/d_out, bias block ∇b∇bᵀ/d_out — not an estimate of any Fisher).
    bias_damping : ``"own"`` (refngd: a separate bias block G ⊗ [1] gets its own π) or
        ``"weight"`` (factored damping of the bias block is (G + √λ/π_W I), π_W the weight's).
    ef_rows : for a loss with T terms per sample (:class:`refngd.losses.PerToken`), the
        empirical Fisher's rows: ``"sample"`` (refngd: one row e_n per sequence, the
        gradient of its loss l_n = Σ_t ℓ_t) or ``"token"`` (one row per token, e_nt in its
        own block: the EF of the N·T token terms, c Σ_{n,t} g_nt g_ntᵀ).
    empirical_kfac_rows : K-FAC's rows with ``fisher_type="empirical"``: ``"e_n"`` (refngd:
        G = c Σ_n e_n e_nᵀ) or ``"c*e_n"`` (the gradients of each sample's term of the
        reduced loss, c·e_n, so that G = Σ_n (c e_n)(c e_n)ᵀ carries c twice).
    factor_columns : for such a loss, K-FAC's type-2 rows: ``"per-token"`` (refngd: the
        T·M columns of the block-diagonal factor blockdiag_t(F_nt), whose outer products
        sum to H_n) or ``"stacked"`` (M rows per sample, column m of every token's factor
        side by side, Σ_t F_nt[:, m] in its blocks: their outer products add the
        off-diagonal blocks F_nt F_nt'ᵀ, so G carries cross-token terms).
    factor_scale : ``"none"`` or a public implementation's per-layer scalars (s_A, s_G) on
        refngd's ``expand`` factors (:data:`refngd.options.FACTOR_SCALES`,
        :func:`refngd.curvature.preset_factors.factor_scalars`); the gradient an update
        preconditions is not scaled.
    gram_rows : ``"g_n"`` (refngd: the Gram form of EF/iEF over the unreduced losses'
        gradients) or ``"c*g_n"`` (over the reduced loss's rows c·g_n, iEF's targets
        ‖c·e_n‖²): the update is then (1/c)·Δ_EF and c·Δ_iEF at damping λ/c².
    options : ``((name, value), ...)``: the options of refngd's entry points that the
        library's code uses — pass ``**dict(conv.options)`` to ``validate``.
    differences : human-readable list of every way it differs from ``"refngd"``.
    status : ``"verified"`` (tested against the installed library) or ``"transcribed"``.
    verified_by : how (and how far) a verified preset is tested.
    sources : where the facts come from.
    """

    name: str
    library: str
    loss_scale: str = "one"
    per_sample: str = "g_n"
    conv_kfac: str = "refngd"
    kfac_factors: str = "fisher"
    bias_damping: str = "own"
    ef_rows: str = "sample"
    empirical_kfac_rows: str = "e_n"
    factor_columns: str = "per-token"
    factor_scale: str = FACTOR_SCALE
    gram_rows: str = GRAM_ROW
    options: tuple = ()
    differences: tuple = ()
    status: str = "verified"
    sources: tuple = field(default=())
    verified_by: str = "tested against the installed library, tests/test_conventions_libraries.py"

    def alpha(self, loss, Z, empirical: bool = False) -> float:
        """α with (library's curvature) = α × (refngd's): a factor on the loss constant c.

        Z : the (N, C) outputs (only their shape is used, through ``loss.scale``).
        empirical : True for curvatures built from the observed labels (EF, iEF, the
            gradient): libraries apply the MSE's ½ to their model's likelihood, not
            necessarily to the user's loss (asdl's EF has no ½, its Fisher does).
        """
        if self.loss_scale == "one":
            return 1.0
        c, N = float(loss.scale(Z)), Z.shape[0]
        half = 0.5 if type(loss).__name__ == "MSELoss" else 1.0
        if self.loss_scale == "per-example-mean":
            return (1.0 if empirical else half) / (N * c)
        if self.loss_scale == "sum-half-mse":
            return half / c
        if self.loss_scale == "batch-mean":
            return 1.0 / (N * c)
        raise ValueError(f"unknown loss_scale {self.loss_scale!r}.")


_VERIFIED_BY = Convention.__dataclass_fields__["verified_by"].default

_REFNGD = Convention(
    "refngd", "refngd",
    differences=(), verified_by="refngd's own test suite (docs/conventions.md)",
    sources=("docs/conventions.md", "docs/kfac.md"))

PRESETS: dict = {p.name: p for p in (
    _REFNGD,
    Convention(
        "curvlinops", "curvlinops-for-pytorch 3.0.1",
        bias_damping="weight", ef_rows="token", factor_columns="stacked",
        differences=(
            "GGN, EF, K-FAC (type-2, mc, empirical; expand, reduce; separate or joint bias) and "
            "EKFAC equal refngd's for CrossEntropyLoss, MSELoss and BCEWithLogitsLoss with "
            "either reduction (BCE only with binary targets).",
            "K-FAC's default fisher_type there is 'mc' (refngd: 'type-2'): pass it explicitly.",
            "Heuristic (factored) damping with a separate bias: the bias block is "
            "(G + √λ/π_W I)⁻¹ with π_W the weight's π = √((tr A/d_A)/(tr G/d_G)); refngd gives "
            "the bias block its own π. Reproduced by KFAC.solve(..., damping_mode='factored').",
            "Its default damping (no heuristic, no exact) is (G + λI)⁻¹ ⊗ (A + λI)⁻¹: neither "
            "of refngd's modes; use_exact_damping=True equals refngd's 'tikhonov'.",
            "EKFAC with kfac_approx='reduce' agrees only when every Conv2d's A_reduce has full "
            "rank: otherwise the re-estimated diagonal depends on the arbitrary eigenbasis of "
            "A's null space (both libraries project exact per-sample gradients), and they differ.",
            "The same holds for Linear layers shared over tokens (EKFAC expand and reduce agree "
            "where A has simple eigenvalues).  Its EKFAC refuses outputs with more than 2 axes.",
            "Outputs with extra axes (a sequence, (N, T, C); (N, C, T) for CrossEntropyLoss) "
            "are flattened into the batch. EFLinearOperator then has one row per token "
            "(c Σ_{n,t} g_nt g_ntᵀ; refngd: one row per sequence): ef_rows='token'. "
            "KFACLinearOperator's type-2 back-propagates column m of every token's Hessian "
            "factor at once (M rows per sample; refngd: T·M), so G has cross-token terms "
            "wherever rows of several tokens meet — with 'reduce' always, with 'expand' "
            "below a layer that mixes tokens: factor_columns='stacked'. Its 'empirical' "
            "and 'mc' K-FAC and the GGN equal refngd's.",
        ),
        sources=("curvlinops/kfac.py, ekfac.py, inverse.py (KFACInverseLinearOperator._compute_damping)",
                 "curvlinops/utils.py (make_functional_flattened_model_and_loss), "
                 "gradient_moments.py (the EF's pseudo-loss), kfac.py "
                 "(_compute_loss_and_backward: one backward per factor column)")),
    Convention(
        "backpack", "backpack-for-pytorch 1.7.1",
        per_sample="c*g_n", conv_kfac="backpack",
        differences=(
            "BatchGrad (per-sample gradients) is c·g_n, the gradient of each sample's term of "
            "the reduced loss; refngd's per_sample_gradients are g_n (no c).",
            "SumGradSquared is Σ_n (c·g_n)² = c·diag(EF) (refngd's EF carries one c).",
            "KFLR (type-2 K-FAC) of a Linear layer equals refngd's with bias='separate'.",
            "KFLR / KFAC of a Conv2d layer is [G_reduce, T·A_expand] (T output locations), bias "
            "factor G_reduce: neither refngd's 'expand' nor 'reduce'.",
            "DiagGGNExact equals Fisher(...).diagonal(); BCEWithLogitsLoss only with one output.",
        ),
        sources=("backpack/extensions/secondorder/{kflr,hbp}", "backpack/extensions/firstorder/batch_grad")),
    Convention(
        "nngeometry", "nngeometry 0.4",
        loss_scale="per-example-mean",
        differences=(
            "FIM(...) is (1/N) Σ_n J_nᵀ H_n J_n whatever the loss's reduction, and "
            "variant='regression' takes H_n = I (the MSE as ½‖z − y‖², Gaussian variance 1): "
            "α = 1/(N·c), times ½ for MSELoss.",
            "PMatKFAC uses a joint bias (ā = [a; 1]; pass bias='joint') and expand for Conv2d; "
            "its factors are √M·T·A and G/(√M·T) of refngd's (M = C − 1 rows for CE, C for "
            "MSE/BCE; T output locations): the same product G ⊗ A. PMatEKFAC (after "
            "update_diag) equals refngd's EKFAC with bias='joint'.",
            "variant='classif_logits' builds its Cholesky factor with the default dtype: with "
            "float64 models set torch.set_default_dtype(torch.float64), otherwise it fails (and "
            "its ε guard is float32's).",
        ),
        sources=("nngeometry/metrics.py (FIM)", "nngeometry/backend/torch_hooks/torch_hooks.py "
                 "(get_kfac_blocks)", "nngeometry/backend/torch_hooks/grads.py (kfac_xx, kfac_gg)")),
    Convention(
        "asdl", "asdfghjkl 0.1a5 (import asdl)",
        loss_scale="per-example-mean",
        differences=(
            "Fisher (fisher_exact, fisher_mc) and EF (fisher_emp) are (1/data_size) Σ_n over the "
            "batch, whatever the loss's reduction (data_size = N here): α = 1/(N·c).",
            "loss_type='mse': the Fisher takes H_n = I (½‖z − y‖², variance 1): a further ½; the "
            "EF uses the user's loss as given (no ½).",
            "SHAPE_KRON factors equal refngd's 'expand' K-FAC (A as refngd, B = α·G) for Linear "
            "and Conv2d, weight and bias kept separate.",
        ),
        sources=("asdl/fisher.py (FisherMaker.forward_and_backward, FisherExactMSE)",)),
    Convention(
        "kfac-jax", "kfac-jax 0.0.8", loss_scale="batch-mean", empirical_kfac_rows="c*e_n",
        verified_by="tested against kfac-jax 0.0.8 itself (BlockDiagonalCurvature, "
                    "fisher_exact and fisher_empirical) with jax 0.4.38 and "
                    "tensorflow-probability 0.25, tests/test_conventions_kfac_jax.py "
                    "(CI's optional JAX stage)",
        differences=(
            "Registered losses are sums over the batch divided by batch_size: "
            "register_squared_error_loss is Σ‖t − z‖²/N and register_normal_predictive_"
            "distribution (variance ½ by default) the same NLL; register_softmax_cross_entropy_"
            "loss Σ CE/N. So c = 1/N even for the squared error (PyTorch's MSELoss 'mean' has "
            "1/(N·C)): α = 1/(N·c).",
            "Dense layers: the bias joins the weight (ā = [a; 1]; pass bias='joint'); JAX "
            "stores kernels as (in, out), so vec(W) is column-major relative to PyTorch's "
            "(out, in): transpose kernels when mapping θ (docs/validating.md).",
            "estimation_mode='fisher_empirical' builds G from the gradients of each sample's "
            "term of the batch-mean loss, e_n/N: G = Σ_n (e_n/N)(e_n/N)ᵀ, 1/N × refngd's "
            "empirical K-FAC (empirical_kfac_rows='c*e_n'); 'fisher_exact' equals refngd's "
            "type-2 K-FAC; 'ggn_curvature_prop' is a Monte-Carlo estimate (random "
            "projections), compared by check.validate's sampled tolerance only.",
            "kfac-jax 0.0.8 needs tensorflow-probability's JAX substrate: the newest "
            "tensorflow-probability on the index (0.25) imports with jax up to 0.4.38, not "
            "with current jax; the test pins that stack.",
        ),
        sources=("kfac_jax/_src/loss_functions.py (register_* docstrings and normalisation)",
                 "kfac_jax/_src/curvature_blocks/kronecker_factored.py (ones column)",
                 "kfac_jax/_src/curvature_estimator/block_diagonal.py "
                 "(update_curvature_matrix_estimate)")),
    Convention(
        "laplace", "laplace-torch 0.3", loss_scale="sum-half-mse",
        verified_by="GGN and EF through its curvlinops (classification) and BackPACK "
                    "(classification, regression) backends, tests/test_conventions_libraries.py",
        differences=(
            "The log-likelihood is summed over the data (its backends run losses with "
            "reduction='sum'): curvature and EF = Σ_n, α = 1/c (N× refngd's for a mean "
            "CrossEntropyLoss).",
            "likelihood='regression' multiplies the MSE(sum) GGN and EF by ½ (a Gaussian of "
            "variance 1; CurvatureInterface.factor). Its curvlinops backend's regression path "
            "fails under torch 2.13's functorch; the BackPACK backend (needs model.output_size) "
            "runs and agrees.",
            "KronLaplace takes its K-FAC from the backend (BackPACK / curvlinops / ASDL), so "
            "Conv2d factors follow that backend's convention.",
            "With a float64 model set torch.set_default_dtype(torch.float64): laplace creates "
            "intermediates in the default dtype (float32 limits agreement to ~3e-8).",
        ),
        sources=("laplace/curvature/curvature.py (factor)", "laplace/curvature/curvlinops.py")),
    Convention(
        "tutorial", "the widespread 'simplified K-FAC'", kfac_factors="tutorial", status="verified",
        verified_by="tested against hand-written PyTorch code of the recipe, "
                    "tests/test_conventions_libraries.py",
        differences=(
            "K-FAC factors from the aggregated weight gradient ∇W of the batch loss: "
            "G = ∇W∇Wᵀ/d_out (d_out × d_out), A = ∇Wᵀ∇W/d_out (d_in × d_in), bias block "
            "∇b∇bᵀ/d_out — no per-sample statistics, both factors from one matrix (rank ≤ "
            "rank ∇W), not an estimate of any Fisher (docs/validating.md shows how far it is).",
            "The running average (β = 0.99 from zero) of such code is left out: one step of it "
            "is (1 − β) times these factors.",
        ),
        sources=("a common blog-post K-FAC (hooks on weight.grad)",)),
)}

# public research code (refngd.conventions.public holds their fields; one registry)
from .public import PUBLIC_PRESETS  # noqa: E402

PRESETS.update({kw["name"]: Convention(**kw) for kw in PUBLIC_PRESETS})


def names() -> list:
    """All preset names."""
    return list(PRESETS)


def get(name) -> Convention:
    """The preset ``name`` (a :class:`Convention` passes through); unknown names raise."""
    if isinstance(name, Convention):
        return name
    if name is None:
        return _REFNGD
    key = str(name).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown convention {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[key]


def describe(name) -> str:
    """Every way convention ``name`` differs from refngd's default, as readable text."""
    conv = get(name)
    how = conv.verified_by if conv.status == "verified" else "read from its source, not run here"
    if conv.status != "verified" and conv.verified_by != _VERIFIED_BY:
        how += "; " + conv.verified_by
    head = f"convention {conv.name!r}: {conv.library} ({conv.status}: {how})"
    if not conv.differences:
        return head + "\n  refngd's default: docs/conventions.md and docs/kfac.md."
    lines = [head] + [f"  - {d}" for d in conv.differences]
    if conv.options:
        lines.append("  options its code uses: " + ", ".join(f"{k}={v!r}" for k, v in conv.options))
    if conv.sources:
        lines.append("  sources: " + "; ".join(conv.sources))
    return "\n".join(lines)


def per_sample_gradients(G, loss, Z, convention) -> object:
    """Per-sample gradients (N, P) as ``convention`` defines them, from refngd's g_n."""
    conv = get(convention)
    if conv.per_sample == "c*g_n":
        return loss.scale(Z) * G
    return G

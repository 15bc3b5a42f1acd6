"""``refngd check``: validate a candidate from files (any framework) against refngd.

Exit status: 0 the candidate matches, 1 it does not (the report says why), 2 a usage
error or a bad input file (one line on stderr saying what is wrong).
"""
from __future__ import annotations

import argparse
import sys

from .. import conventions, options
from .quantities import QUANTITIES


class _Given(argparse.Action):
    """Stores the value and records that the user gave the option (``--infer`` keeps it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = set(getattr(namespace, "given", ())) | {self.dest}


#: the options ``--infer`` treats as known when given
_KNOWN_FLAGS = ("convention", "fisher_type", "kfac_approx", "bias", "damping_mode", "form",
                "pi", "damping_split")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" only for options that have a real default (not None / off);
    the formatter of both ``refngd`` subcommands."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def add_check_parser(sub) -> argparse.ArgumentParser:
    """The ``check`` subcommand on ``refngd``'s subparsers."""

    p = sub.add_parser(
        "check", help="validate a curvature quantity computed by your code against refngd",
        description=("Compare a candidate (per-sample gradients, Fisher, K-FAC factors, an update, "
                     "...) computed by any implementation with refngd's value for the same network, "
                     "weights and batch; print per-block errors and a diagnosis. Exit 0 if it "
                     "matches, 1 if not, 2 for bad input. File formats: docs/validating.md."),
        formatter_class=HelpFormatter)
    p.add_argument("--arch", required=True, metavar="ARCH.json",
                   help="architecture: PyTorch layer names and arguments, and the loss")
    p.add_argument("--weights", required=True, metavar="W.npz|W.pt",
                   help="'theta' in parameters_to_vector order or state_dict arrays (.npz), or a "
                        "state_dict (.pt, read with torch.load(weights_only=True))")
    p.add_argument("--batch", required=True, metavar="BATCH.npz", help="arrays X and y")
    p.add_argument("--candidate", required=True, metavar="CAND.npz",
                   help="array 'candidate' (or factors '0.A', '0.G', ... for kfac_factors)")
    p.add_argument("--quantity", required=True, choices=QUANTITIES, metavar="QUANTITY",
                   help=f"what the candidate is, one of: {', '.join(QUANTITIES)}")
    p.add_argument("--convention", action=_Given, default=options.CONVENTION, choices=conventions.names(),
                   help="whose convention the candidate follows (refngd.conventions)")
    p.add_argument("--damping", type=float, default=None, help="λ, for *_update quantities")
    p.add_argument("--mc-samples", type=int, default=1, help="K for sampled quantities")
    p.add_argument("--fisher-type", action=_Given, default=options.FISHER_TYPE, choices=options.FISHER_TYPES,
                   help="K-FAC's output factor G: exact type-2 Fisher, Monte Carlo samples, "
                        "or the empirical Fisher (kfac, ekfac and kfac_factors)")
    p.add_argument("--kfac-approx", action=_Given, default=options.KFAC_APPROX_DEFAULT,
                   choices=options.KFAC_APPROX,
                   help="K-FAC for weights shared over a sequence: expand (sum over positions) "
                        "or reduce (average before the outer product)")
    p.add_argument("--bias", action=_Given, default=options.BIAS, choices=options.BIAS_MODES,
                   help="bias as its own K-FAC block or appended to the weight (a column of ones)")
    p.add_argument("--damping-mode", action=_Given, default=options.DAMPING_MODE, choices=options.DAMPING_MODES,
                   help="K-FAC damping: tikhonov (G ⊗ A + λI), factored "
                        "(G + (√λ/π) I) ⊗ (A + π√λ I), Martens & Grosse (2015, §6.3), or "
                        "per-factor (A + λ_A I) ⊗ (G + λ_G I) (--factor-damping)")
    p.add_argument("--form", action=_Given, default=options.FORM, choices=options.FORMS,
                   help="EF/iEF updates' damping: gram (the paper's, on the N × N Gram "
                        "matrix) or tikhonov (F̃ + λI)⁻¹g on the P × P matrix; see "
                        "refngd.updates")
    p.add_argument("--pi", action=_Given, default=options.PI, type=_pi,
                   help="factored damping's π: 'trace' (Martens & Grosse §6.3) or a number")
    p.add_argument("--damping-split", action=_Given, default=options.DAMPING_SPLIT,
                   choices=options.DAMPING_SPLITS,
                   help="'locations': factored damping λ/T per location of a shared weight")
    p.add_argument("--factor-damping", type=float, nargs=2, default=None,
                   metavar=("LAMBDA_A", "LAMBDA_G"),
                   help="per-factor damping (A + λ_A I) ⊗ (G + λ_G I); needs "
                        "--damping-mode per-factor (instead of --damping)")
    p.add_argument("--labels", default=None, metavar="LABELS.npz",
                   help="array 'labels': your sampled targets for fisher_type mc / "
                        "sampled_fisher (exact comparison)")
    p.add_argument("--rtol", type=float, default=None,
                   help="tolerance on the relative error (default: by the candidate's dtype)")
    p.add_argument("--ema-beta", type=float, default=None, metavar="BETA",
                   help="with --infer: the β of your code's running averages, for scalars "
                        "(1-β)^k (default: tries 0.9, 0.95, 0.99, 0.999)")
    p.add_argument("--infer", action="store_true",
                   help="search the conventions (options, named scalars N, T, C, K, 2, (1-β), "
                        "the damping map) for one that reproduces the candidate "
                        "(refngd.check.infer); the options you give are kept fixed")
    p.set_defaults(given=set())
    return p


def _pi(text: str):
    """``--pi``: 'trace' or a number."""
    if text in options.PI_RULES:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'trace' or a number, got {text!r}") from None


def run_check(args) -> int:
    """Run ``refngd check``; returns the exit status."""
    from .files import (FileFormatError, input_shape_ok, load_architecture, load_batch,
                        load_candidate, load_labels, load_weights)
    from .validate import check_twin, make_twin

    try:
        model, loss = load_architecture(args.arch)
        theta = load_weights(args.weights, model)
        X, y = load_batch(args.batch, theta.dtype, integer=model.layers[0].integer_input)
        input_shape_ok(model, theta, X)
        candidate, v = load_candidate(args.candidate, args.quantity)
        damping = args.damping
        if args.factor_damping is not None:
            if damping is not None:
                raise ValueError("pass --damping or --factor-damping, not both.")
            damping = tuple(args.factor_damping)
        labels = None if args.labels is None else load_labels(args.labels)
        if args.ema_beta is not None and not args.infer:
            raise ValueError("--ema-beta is an option of --infer (the β of the scalars it "
                             "names); pass --infer too, or drop --ema-beta.")
        if args.infer:
            from .infer import infer

            known = {k: getattr(args, k) for k in _KNOWN_FLAGS if k in args.given}
            if args.mc_samples != 1:
                known["mc_samples"] = args.mc_samples
            if args.ema_beta is not None:
                known["ema_beta"] = args.ema_beta
            report = infer((model, theta), loss, X, y, args.quantity, candidate, damping,
                           rtol=args.rtol, labels=labels, v=v, **known)
            print(report)
            return 0 if report.passed else 1
        options.check_unused_damping_options(args.damping_mode, args.pi, args.damping_split)
        twin = make_twin((model, theta), loss, X, y, args.convention, damping=damping, v=v,
                         mc_samples=args.mc_samples, fisher_type=args.fisher_type,
                         kfac_approx=args.kfac_approx, bias=args.bias,
                         damping_mode=args.damping_mode, form=args.form, rng=0, pi=args.pi,
                         damping_split=args.damping_split, labels=labels)
        report = check_twin(twin, args.quantity, candidate, rtol=args.rtol)
    except (FileFormatError, ValueError, TypeError) as err:
        print(f"refngd check: error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1

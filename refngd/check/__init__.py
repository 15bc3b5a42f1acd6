"""Validating other implementations: ``compare`` (errors per block and a diagnosis) and
``validate`` (refngd's twin of a PyTorch model computes the reference).  docs/validating.md."""
from .compare import BlockResult, Report, compare, default_rtol
from .quantities import QUANTITIES
from .validate import validate

__all__ = ["compare", "validate", "Report", "BlockResult", "default_rtol", "QUANTITIES"]

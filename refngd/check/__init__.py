"""The validation kit: refngd's reference beside another implementation's numbers.

* :func:`infer` — the convention of a candidate of unknown provenance: options, named
  scalars and damping searched (:mod:`refngd.check.infer`);
* :func:`validate` — refngd's twin of a PyTorch model computes the reference of a named
  quantity and compares it with a candidate (:mod:`refngd.check.validate`);
* :func:`compare` — errors per block and a diagnosis of the difference
  (:mod:`refngd.check.report`);
* ``refngd.interop`` (:mod:`refngd.check.interop`) — PyTorch models, losses and tensors as
  refngd objects; ``refngd.testing`` (:mod:`refngd.check.testing`) — ``assert_matches``
  for a user's own test suite;
* :mod:`refngd.check.files` and :mod:`refngd.check.cli` — ``refngd check`` on saved files.

docs/validating.md.  The conventions the kit compares under are :mod:`refngd.conventions`.
"""
from .infer import Inference, InferenceReport, infer
from .quantities import QUANTITIES
from .report import BlockResult, Report, compare, default_rtol
from .validate import validate

__all__ = ["compare", "validate", "infer", "Inference", "InferenceReport", "Report",
           "BlockResult", "default_rtol", "QUANTITIES"]

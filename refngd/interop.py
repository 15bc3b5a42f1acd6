"""``refngd.interop`` is :mod:`refngd.check.interop`, the PyTorch interop of the validation kit (one module, two names).

The module lives in the validation kit's package, :mod:`refngd.check`; this name stays
importable as it always was.  ``sys.modules`` maps it to the same module object, so
``refngd.interop.X`` and ``refngd.check.interop.X`` are one and the same.
"""
import sys

from .check import interop as _module

sys.modules[__name__] = _module

"""``refngd.testing`` is :mod:`refngd.check.testing`, test helpers of the validation kit (one module, two names).

The module lives in the validation kit's package, :mod:`refngd.check`; this name stays
importable as it always was.  ``sys.modules`` maps it to the same module object, so
``refngd.testing.X`` and ``refngd.check.testing.X`` are one and the same.
"""
import sys

from .check import testing as _module

sys.modules[__name__] = _module

"""Helpers for a user's own test suite (``refngd.testing``): ``assert_matches`` (docs/validating.md)."""
from __future__ import annotations

from ..options import CONVENTION
from .validate import validate


def assert_matches(model, loss, X, y, quantity: str, candidate, convention: str = CONVENTION,
                   **options):
    """Assert that ``candidate`` equals refngd's ``quantity`` (:func:`refngd.check.validate`).

    Raises ``AssertionError`` whose message is the full report — per-block errors and the
    diagnosis — when it does not; returns the :class:`refngd.check.Report` otherwise.
    """
    report = validate(model, loss, X, y, quantity, candidate, convention, **options)
    if not report.passed:
        raise AssertionError("\n" + str(report))
    return report

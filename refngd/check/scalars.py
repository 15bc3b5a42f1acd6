"""Named scalars for :func:`refngd.check.infer`: monomials in N, T, C, K, 2 and an EMA's (1 − β).

Implementations of one formula differ by scalars that come from their bookkeeping: a
mean-reduced loss averaged again (1/N), factors built from already-averaged gradients
(1/N², 1/(N²T³)), a convolution's locations (T), the classes (C), Monte-Carlo samples (K),
the MSE's 2, a running average started from zero ((1 − β) after one step).  ``infer``
fits every scalar in closed form (a least-squares ratio) and then *names* it: a scalar
is explained when it equals, to the fit's tolerance, a monomial

    N^a · T^b · C^c · K^d · 2^e · (1 − β)^k,

with small exponents (|a|, |b| ≤ 3, |c| ≤ 2, |d| ≤ 1, |e| ≤ 2 — half-integers for the
square roots a factored damping's π takes, Martens & Grosse 2015, §6.3 — and k ≤ 2 for
β in :data:`EMA_BETAS` or the β the user names).  Sizes that coincide (N = T, C = 2) give
several names for one number; :func:`name` returns them all, simplest first, and the
report says the data cannot tell them apart.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

#: running-average decays tried for an EMA started from zero ((1 − β) after one step)
EMA_BETAS = (0.9, 0.95, 0.99, 0.999)
#: largest |exponent| per size; half-integer exponents (a π) reach only _HALF_RANGES
_RANGES = {"N": 3, "T": 3, "C": 2, "K": 1, "2": 2}
_HALF_RANGES = {"N": 1.5, "T": 1.5, "C": 1, "K": 0.5, "2": 1}


@dataclass(frozen=True)
class Monomial:
    """N^a T^b C^c K^d 2^e (1 − β)^k: ``powers`` {symbol: exponent}, ``beta`` (or None)."""

    powers: tuple          # ((symbol, exponent), ...) with exponent ≠ 0, sorted
    value: float
    beta: float | None = None
    k: int = 0

    @property
    def complexity(self) -> float:
        """Simplest first: total |exponent|, then the number of symbols (ties: 2 last)."""
        return (sum(abs(e) + 0.5 * (not float(e).is_integer()) for _, e in self.powers)
                + self.k + 0.1 * (len(self.powers) + (self.k > 0)))

    def __str__(self) -> str:
        num, den = [], []
        for s, e in self.powers:
            side = num if e > 0 else den
            a = abs(e)
            side.append(s if a == 1 else f"{s}^{_exp(a)}")
        if self.k:
            t = f"(1-{self.beta:g})"
            num.append(t if self.k == 1 else f"{t}^{self.k}")
        top = "*".join(num) or "1"
        if not den:
            return top
        bottom = "*".join(den)
        return f"{top}/{bottom}" if len(den) == 1 else f"{top}/({bottom})"


def _exp(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else f"{a:g}"


def sizes(N: int, C: int, T: int = 1, K: int = 1) -> dict:
    """The sizes a scalar may be built from (a size of 1 contributes nothing)."""
    return {k: v for k, v in (("N", N), ("T", T), ("C", C), ("K", K), ("2", 2)) if v > 1}


def monomials(ctx: dict, half: bool = False, betas=EMA_BETAS, ema: bool = True) -> list:
    """Every :class:`Monomial` over the sizes ``ctx`` (:func:`sizes`), simplest first.

    ``half``: half-integer exponents too (a π, the square root of a ratio of factors).
    ``ema``: include (1 − β)^k, k = 1, 2, for each β in ``betas``.
    """
    key = (tuple(sorted(ctx.items())), half, tuple(betas), ema)
    if key in _CACHE:
        return _CACHE[key][0]
    step, ranges = (0.5, _HALF_RANGES) if half else (1.0, _RANGES)
    syms = list(ctx)
    grids = [[i * step for i in range(-int(ranges[s] / step), int(ranges[s] / step) + 1)]
             for s in syms]
    emas = [(None, 0)] + ([(b, k) for b in betas for k in (1, 2)] if ema and not half else [])
    out = []
    for exps in itertools.product(*grids):
        logv = sum(e * math.log(ctx[s]) for s, e in zip(syms, exps))
        powers = tuple((s, e) for s, e in zip(syms, exps) if e != 0)
        for b, k in emas:
            lv = logv + (k * math.log(1 - b) if k else 0.0)
            out.append(Monomial(powers, math.exp(lv), b, k))
    out.sort(key=lambda m: m.complexity)
    by_value = sorted(out, key=lambda m: m.value)
    _CACHE[key] = (out, by_value, [math.log(m.value) for m in by_value])
    return out


_CACHE: dict = {}


def name(x: float, ctx: dict, rtol: float, half: bool = False, betas=EMA_BETAS,
         ema: bool = True) -> list:
    """The monomials equal to ``x > 0`` within relative ``rtol``, simplest first (maybe [])."""
    if not (x > 0 and math.isfinite(x)):
        return []
    monomials(ctx, half, betas, ema)
    _, by_value, logs = _CACHE[(tuple(sorted(ctx.items())), half, tuple(betas), ema)]
    lx, w = math.log(x), math.log1p(rtol)
    lo, hi = bisect.bisect_left(logs, lx - w), bisect.bisect_right(logs, lx + w)
    return sorted((m for m in by_value[lo:hi] if abs(x / m.value - 1) <= rtol),
                  key=lambda m: m.complexity)


def label(x: float, hits: list) -> str:
    """The simplest name of ``x``, or the number itself when nothing names it."""
    return str(hits[0]) if hits else f"{x:.6g}"

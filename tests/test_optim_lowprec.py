"""refngd.optim.LowPrecision: the state stored in bfloat16 / float16, steps computed in float32.

Checked against closed forms: the rounding is round-to-nearest-even into the format (bit
patterns), one step equals the wrapped optimizer's step on the loaded state followed by
that rounding, float64 storage is the plain optimizer exactly, a running average whose
increment is below half an ulp does not move in bfloat16 (it does in float32), and float16
flushes tiny second moments to zero.  bfloat16 needs ml_dtypes (skipped without it).
"""
import sys

import numpy as np
import pytest

from refngd import optim
from refngd.optim.lowprec import LowPrecision, round_to, storage_dtype

import handmlp

OPTS = [lambda: optim.Adam(lr=1e-2), lambda: optim.RFAdam(lr=0.5), lambda: optim.KFAC(lr=0.1),
        lambda: optim.IKFAC(lr=0.03, update_every=1), lambda: optim.INGD(lr=1e-3, update_every=1),
        lambda: optim.SIRFShampoo(lr=0.03, update_every=1)]


def _bf16():
    pytest.importorskip("ml_dtypes")
    return "bfloat16"


def _arrays(state):
    if isinstance(state, dict):
        return [a for v in state.values() for a in _arrays(v)]
    if isinstance(state, (list, tuple)):
        return [a for v in state for a in _arrays(v)]
    return [state] if isinstance(state, np.ndarray) else []


def test_bfloat16_rounding_is_round_to_nearest_even_on_the_top_16_bits():
    name = _bf16()
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7, 3.14159265, -2.5e-3, 1e30],
                 dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    lower = bits & 0xFFFF
    up = (lower > 0x8000) | ((lower == 0x8000) & (((bits >> 16) & 1) == 1))
    want = (((bits >> 16) + up) << 16).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(round_to(x, name), want)
    assert round_to(np.float32(1 + 2**-8), name) == 1.0            # a tie: to even (1.0)
    assert round_to(np.float32(1 + 3 * 2**-8), name) == 1 + 2**-6  # a tie: to even (up)


@pytest.mark.parametrize("make", OPTS)
@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_step_is_the_wrapped_step_on_the_loaded_state_then_rounded(make, fmt):
    if fmt == "bfloat16":
        _bf16()
    model, theta, loss, X, y = handmlp.make(seed=1, N=16)
    opt, lp = make(), LowPrecision(make(), fmt)
    state = lp.init(theta)
    th = theta.astype(np.float32)
    for t in range(3):
        rng = np.random.default_rng(t)
        got_th, got_state, _ = lp.step(th, state, model, loss, X, y, rng=rng)
        want_th, want_state, _ = opt.step(th, lp.load(state), model, loss, X, y,
                                          rng=np.random.default_rng(t))
        np.testing.assert_array_equal(got_th, want_th.astype(np.float32))
        got, want = _arrays(got_state), _arrays(want_state)
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            assert a.dtype == storage_dtype(fmt)
            np.testing.assert_array_equal(a.astype(np.float32), round_to(b, fmt))
        th, state = got_th, got_state


@pytest.mark.parametrize("make", OPTS)
def test_float64_storage_is_the_plain_optimizer(make):
    model, theta, loss, X, y = handmlp.make(seed=2, N=16)
    opt, lp = make(), LowPrecision(make(), "float64", compute="float64")
    s1, s2, t1, t2 = opt.init(theta), lp.init(theta), theta, theta
    for t in range(3):
        t1, s1, _ = opt.step(t1, s1, model, loss, X, y, rng=np.random.default_rng(t))
        t2, s2, _ = lp.step(t2, s2, model, loss, X, y, rng=np.random.default_rng(t))
    np.testing.assert_array_equal(t1, t2)


def test_running_average_below_half_an_ulp_does_not_move_in_bfloat16():
    """RF-RMSProp with β₂ = 10⁻³ (the order of Lin et al.'s tuned values), N = 1: s = (1 − β₂)
    + β₂ B g².  Where |β₂ (B g² − 1)| < 2⁻⁹ (half bfloat16's ulp just below 1) the stored s
    stays exactly 1; float32 storage moves it to the closed form.  (A decrease is at most
    β₂ s < 2⁻⁹ s for any s: in bfloat16 this running average can only grow.)"""
    name = _bf16()
    model, theta, loss, X, y = handmlp.make(seed=0, N=1)
    import refngd

    g = refngd.gradient(model, theta, loss, X, y).astype(np.float32)
    beta2 = 1e-3
    exact = (1 - beta2) + beta2 * g.astype(np.float64) ** 2
    lp16, lp32 = (LowPrecision(optim.RFRMSProp(lr=1e-3, beta2=beta2), f) for f in (name, "float32"))
    s16 = lp16.step(theta, lp16.init(theta), model, loss, X, y)[1]["s"].astype(np.float64)
    s32 = lp32.step(theta, lp32.init(theta), model, loss, X, y)[1]["s"].astype(np.float64)
    np.testing.assert_allclose(s32, exact, rtol=1e-6)
    stuck = np.abs(exact - 1) < 2.0**-9
    assert stuck.sum() > 10 and (s32[stuck] != 1).any()
    assert (s16[stuck] == 1.0).all()                            # the update is lost
    np.testing.assert_array_equal(s16, round_to(exact, name))   # elsewhere: rounded


def test_float16_flushes_tiny_second_moments_to_zero():
    """Adam's v = (1 − β₂) g² = 10⁻³ g²: below float16's smallest subnormal (2⁻²⁴ ≈ 6·10⁻⁸)
    it is stored as 0 — bfloat16 (float32's exponent range) keeps it."""
    model, theta, loss, X, y = handmlp.make(seed=0, N=16)
    lp = LowPrecision(optim.Adam(lr=1e-3), "float16")
    v = lp.step(theta, lp.init(theta), model, loss, X, y)[1]["exp_avg_sq"]
    import refngd

    g = refngd.gradient(model, theta, loss, X, y)
    exact = 1e-3 * g**2
    tiny = (exact < 2.0**-25) & (exact > 0)
    assert tiny.any() and (v[tiny] == 0).all()
    lpb = LowPrecision(optim.Adam(lr=1e-3), _bf16())
    vb = lpb.step(theta, lpb.init(theta), model, loss, X, y)[1]["exp_avg_sq"]
    assert (vb.astype(np.float32)[tiny] > 0).all()


def test_state_is_held_in_the_storage_dtype_and_theta_in_float32():
    model, theta, loss, X, y = handmlp.make(seed=0, N=8)
    lp = LowPrecision(optim.IKFAC(lr=0.03, update_every=1), "float16")
    th, st, _ = lp.step(theta, lp.init(theta), model, loss, X, y)
    assert th.dtype == np.float32
    assert all(a.dtype == np.float16 for a in _arrays(st))
    assert lp.name == "ikfac@float16" and lp.hyperparameters()["dtype"] == "float16"
    d = lp.direction(th, st, model, loss, X, y)
    assert d.shape == theta.shape


def test_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="dtype must be one of"):
        LowPrecision(optim.Adam(), "float8")
    with pytest.raises(ValueError, match="compute must be one of"):
        LowPrecision(optim.Adam(), "float16", compute="float16")
    with pytest.raises(TypeError, match="refngd.optim optimizer"):
        LowPrecision("adam")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)      # as if not installed
    with pytest.raises(ImportError, match=r"refngd\[lowprec\]"):
        LowPrecision(optim.Adam(), "bfloat16")
    LowPrecision(optim.Adam(), "float16")                    # float16 needs no ml_dtypes


def test_float16_on_cupy_matches_numpy_and_bfloat16_is_refused():
    """float16 storage on CuPy arrays: the same stored bits as on NumPy after two steps (a
    step's float32 arithmetic may differ in the last bit between BLAS libraries: compared
    to one float16 ulp); bfloat16 on CuPy is refused with a clear message."""
    from devices import gpu_available

    if not gpu_available():
        pytest.skip("needs CuPy and a GPU")
    import cupy

    model, theta, loss, X, y = handmlp.make(seed=1, N=16)
    for make in (lambda: optim.RFAdam(lr=0.5), lambda: optim.IKFAC(lr=0.03, update_every=1)):
        lp = LowPrecision(make(), "float16")
        th, st = theta, lp.init(theta)
        thc, stc = cupy.asarray(theta), lp.init(cupy.asarray(theta))
        for _ in range(2):
            th, st, _ = lp.step(th, st, model, loss, X, y)
            thc, stc, _ = lp.step(thc, stc, model, loss, cupy.asarray(X), cupy.asarray(y))
        for a, b in zip(_arrays(st), [cupy.asnumpy(v) for v in _cuarrays(stc)]):
            assert b.dtype == np.float16
            np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=2**-10,
                                       atol=2**-24)
    if importlib_util_find("ml_dtypes"):
        with pytest.raises(TypeError, match="CuPy has no bfloat16"):
            LowPrecision(optim.Adam(), "bfloat16").init(cupy.asarray(theta))


def _cuarrays(state):
    if isinstance(state, dict):
        return [a for v in state.values() for a in _cuarrays(v)]
    if isinstance(state, (list, tuple)):
        return [a for v in state for a in _cuarrays(v)]
    return [state] if hasattr(state, "dtype") and hasattr(state, "ndim") else []


def importlib_util_find(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None

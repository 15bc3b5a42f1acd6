"""The memory planner (refngd.memory): estimates against measured allocations, the error,
the budget overrides.

NumPy reports its array allocations to ``tracemalloc``, so the peak of a route is measured
directly; the estimates are upper estimates and must lie within 0.5–2× of that peak.
Every test that triggers the error sets a tiny budget: nothing large is ever allocated.
"""
import tracemalloc

import numpy as np
import pytest

from refngd import FunctionModel, losses, memory, nn
from refngd.curvature import EmpiricalFisher, Fisher, SampledFisher
from refngd.backend import PSDFactor
from refngd.memory import MemoryPlanError

LOSS = losses.CrossEntropy()


def mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10)), (20,)


def small_mlp():
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10)), (20,)


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10)), (3, 8, 8)


def problem(make, N, dtype="float64", seed=0):
    model, shape = make()
    rng = np.random.default_rng(seed)
    theta = model.init(rng).astype(dtype)
    return model, shape, theta, rng.standard_normal((N,) + shape), rng.integers(0, 10, N)


def traced_peak(f):
    """Peak bytes allocated (tracemalloc, which sees NumPy's arrays) while f() runs."""
    f()  # warm-up: first calls import modules and fill caches
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        f()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def gram_estimate(F, shape, N):
    est = memory.gram_route_estimate(F.model, shape, F.rows.K, F.theta.dtype.itemsize,
                                     F.num_params, F.subset)
    return est(N)


# --------------------------------------------------------------------------- estimates
@pytest.mark.parametrize("make, N, dtype, cls, route", [
    (mlp, 40, "float64", Fisher, None),
    (mlp, 40, "float32", Fisher, None),
    (mlp, 40, "float64", EmpiricalFisher, None),
    (cnn, 24, "float64", Fisher, None),
    (cnn, 24, "float32", Fisher, None),
    (cnn, 24, "float64", Fisher, "materialise"),
    (cnn, 24, "float64", Fisher, "spatial"),
])
def test_gram_route_estimate_within_2x_of_measured_peak(make, N, dtype, cls, route):
    model, shape, theta, X, y = problem(make, N, dtype)
    for layer in model.layers:
        if isinstance(layer, nn.Conv2d):
            layer.gram_route = route
    lin = model.linearize(theta, X)
    holder = {}

    def run():
        F = cls(model, theta, LOSS, X, y, linearization=lin)
        F.natural_gradient(1e-3)
        holder["F"] = F

    peak = traced_peak(run)
    F = holder["F"]
    assert F.rows.R < F.num_params  # the Gram route
    est = sum(gram_estimate(F, shape, N).values())
    assert 0.5 * peak <= est <= 2 * peak, (est, peak)


@pytest.mark.parametrize("make, dtype", [(mlp, "float64"), (cnn, "float32")])
def test_rows_estimate_is_the_rowsets_nbytes(make, dtype):
    N = 7
    model, shape, theta, X, y = problem(make, N, dtype)
    F = Fisher(model, theta, LOSS, X, y)
    held = sum(e.B.nbytes for e in F.rows.layers)
    assert gram_estimate(F, shape, N)["rows' per-layer buffers"] == held
    mask = np.zeros(model.num_params, bool)
    mask[model.slices[-1][0]:] = True  # the last layer only: only its rows are kept
    Fs = Fisher(model, theta, LOSS, X, y, params=mask)
    assert gram_estimate(Fs, shape, N)["rows' per-layer buffers"] == sum(e.B.nbytes for e in Fs.rows.layers)


@pytest.mark.parametrize("make", [small_mlp, cnn])
def test_dense_estimates(make):
    """U's part is exact; the whole of each dense route within 2× of its measured peak."""
    N = 6
    model, shape, theta, X, y = problem(make, N)
    F = Fisher(model, theta, LOSS, X, y)
    U = F.row_matrix()
    est = memory.dense_estimate(model, F.rows.K, 8, F.num_params, "rows")(N)
    assert est["rows U (R x P)"] == U.nbytes
    for route, f in (("rows", F.row_matrix), ("dense", F.dense)):
        peak = traced_peak(f)
        total = sum(memory.dense_estimate(model, F.rows.K, 8, F.num_params, route)(N).values())
        assert 0.5 * peak <= total <= 2 * peak, (route, total, peak)


def test_p_le_r_routes_estimate_within_2x():
    """A model with fewer parameters than rows: the P × P factorisation and the QR solve."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # P = 51
    rng = np.random.default_rng(3)
    theta, X, y = model.init(rng), rng.standard_normal((200, 4)), rng.integers(0, 3, 200)
    F = Fisher(model, theta, LOSS, X, y)
    assert F.num_params <= F.rows.R
    g = F.gradient()
    for route, f in (("lstsq", lambda: F.natural_gradient(1e-3)),
                     ("factor", lambda: (setattr(F, "_F64", None), F.solve(g, 1e-3)))):
        peak = traced_peak(f)
        total = sum(memory.dense_estimate(model, F.rows.K, 8, F.num_params, route)(200).values())
        assert 0.5 * peak <= total <= 2 * peak, (route, total, peak)


# --------------------------------------------------------------------------- the error
def test_error_says_needed_available_and_the_batch_that_fits():
    N = 50
    model, shape, theta, X, y = problem(mlp, N)
    lin = model.linearize(theta, X)
    F = Fisher(model, theta, LOSS, X, y, linearization=lin)
    est = memory.gram_route_estimate(model, shape, F.rows.K, 8, F.num_params, None)
    budget = sum(est(20).values()) + 1
    with memory.budget(budget):
        with pytest.raises(MemoryPlanError) as info:
            Fisher(model, theta, LOSS, X, y, linearization=lin)
        err = info.value
        assert isinstance(err, MemoryError)
        assert err.needed == sum(est(N).values()) and err.available == budget
        assert err.fits == 20  # the largest N whose estimate is within the budget
        msg = str(err)
        for part in ("needs about", memory.format_bytes(err.needed), "available",
                     memory.format_bytes(budget), "N = 20", f"N = {N}", "rows' per-layer buffers",
                     "Gram route", memory.ENV_VAR, "set_budget"):
            assert part in msg, part
        # the batch it names does fit, and gives the same direction as without planning
        d = Fisher(model, theta, LOSS, X[:20], y[:20]).natural_gradient(1e-3)
    with memory.budget("off"):
        d_ref = Fisher(model, theta, LOSS, X[:20], y[:20]).natural_gradient(1e-3)
    np.testing.assert_array_equal(d, d_ref)


def test_error_before_any_row_is_backpropagated(monkeypatch):
    model, shape, theta, X, y = problem(cnn, 8)
    lin = model.linearize(theta, X)
    calls = []
    monkeypatch.setattr(type(lin), "backprop", lambda self, *a, **k: calls.append(1))
    with memory.budget(1000), pytest.raises(MemoryPlanError):
        SampledFisher(model, theta, LOSS, X, y, mc_samples=2, rng=0, linearization=lin)
    assert not calls


def test_dense_routes_are_planned():
    model, shape, theta, X, y = problem(mlp, 5)
    F = Fisher(model, theta, LOSS, X, y)
    P = F.num_params
    with memory.budget(P * P):  # U fits, UᵀU and its temporaries do not
        F.row_matrix()
        with pytest.raises(MemoryPlanError, match="dense P x P") as info:
            F.dense()
    assert info.value.fits < 5


def test_no_batch_fits_when_the_p_by_p_part_alone_is_too_big():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    rng = np.random.default_rng(3)
    theta, X, y = model.init(rng), rng.standard_normal((100, 4)), rng.integers(0, 3, 100)
    F = Fisher(model, theta, LOSS, X, y)  # P = 51 ≤ R = 200: the QR route
    with memory.budget(100 * 51 * 8), pytest.raises(MemoryPlanError, match="No batch size fits") as info:
        F.natural_gradient(1e-3)
    assert info.value.fits == 0


def test_function_model_is_planned():
    import autograd.numpy as anp

    def f(theta, X):
        return anp.tanh(X @ theta[:12].reshape(4, 3)) @ theta[12:].reshape(3, 3)

    rng = np.random.default_rng(0)
    theta = rng.standard_normal(21)
    X, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    model = FunctionModel(f, theta)
    with memory.budget(10):
        with pytest.raises(MemoryPlanError, match="Jacobian"):
            Fisher(model, theta, LOSS, X, y)


# --------------------------------------------------------------------------- overrides
def test_environment_variable_and_set_budget(monkeypatch):
    model, shape, theta, X, y = problem(mlp, 10)
    monkeypatch.setenv(memory.ENV_VAR, "1kB")
    with pytest.raises(MemoryPlanError, match=memory.ENV_VAR):
        Fisher(model, theta, LOSS, X, y)
    with memory.budget("off"):  # the module setting wins over the environment
        Fisher(model, theta, LOSS, X, y)
    monkeypatch.setenv(memory.ENV_VAR, "off")
    Fisher(model, theta, LOSS, X, y)
    assert memory.available(np) == (None, memory.ENV_VAR)
    monkeypatch.setenv(memory.ENV_VAR, "lots")
    with pytest.raises(ValueError, match="memory budget"):
        Fisher(model, theta, LOSS, X, y)
    monkeypatch.delenv(memory.ENV_VAR)
    previous = memory.set_budget(123)
    try:
        assert memory.available(np) == (123, "refngd.memory.set_budget")
    finally:
        memory.set_budget(previous)
    assert memory.available(np)[1] == "MemAvailable"


def test_parse_bytes():
    assert memory.parse_bytes(1234) == 1234
    assert memory.parse_bytes("1.5GB") == 1_500_000_000
    assert memory.parse_bytes("2 GiB") == 2 * 2 ** 30
    assert memory.parse_bytes("512mib") == 512 * 2 ** 20
    assert memory.parse_bytes("2e9") == 2_000_000_000
    assert memory.parse_bytes("off") is None and memory.parse_bytes(False) is None
    for bad in ("1.5 XB", "-3", -3, float("nan"), "", True):
        with pytest.raises(ValueError):
            memory.parse_bytes(bad)


def test_free_memory_is_read_on_linux():
    free = memory.free_bytes(np)
    if free is None:
        pytest.skip("no /proc/meminfo or sysconf on this platform")
    assert isinstance(free, int) and free > 0


def test_kfac_and_ekfac_dense_are_planned():
    from refngd.curvature import EKFAC, KFAC

    model, shape, theta, X, y = problem(small_mlp, 5)
    P = model.num_params
    for cls in (KFAC, EKFAC):
        C = cls(model, theta, LOSS, X, y)
        with memory.budget(P * P * 8):  # the P × P result fits, with its copy it does not
            with pytest.raises(MemoryPlanError, match=f"dense {cls.__name__} matrix") as info:
                C.dense()
        assert info.value.fits is None and "batch" not in str(info.value).split("available")[1]
        with memory.budget(3 * P * P * 8):
            assert C.dense().shape == (P, P)


def test_keep_freed_memory_is_an_opt_in_that_reports_itself():
    import sys

    applied = memory.keep_freed_memory(64 << 20)
    assert isinstance(applied, bool)
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert applied
    # refngd computes the same numbers after it (it changes where memory comes from only)
    A = np.random.default_rng(1).standard_normal((6, 6))
    A = A @ A.T + np.eye(6)
    np.testing.assert_allclose(PSDFactor(A).solve(np.ones(6)), np.linalg.solve(A, np.ones(6)),
                               rtol=1e-12)


"""Bad input fails early with a clear message (exception type *and* wording checked).

refngd's rule: never return NaNs, silently broadcast, or truncate; say what was wrong
and how to fix it.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import refngd
from refngd import backend, nn
from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss

HAS_CONV = hasattr(nn, "Conv2d")
needs_conv = pytest.mark.skipif(not HAS_CONV, reason="refngd.nn has no Conv2d yet")


@pytest.fixture
def mlp():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    theta = model.init(rng)
    X = rng.standard_normal((5, 3))
    y = rng.integers(0, 2, size=5)
    return model, theta, X, y


@pytest.fixture
def cnn():
    rng = np.random.default_rng(1)
    if not HAS_CONV:
        pytest.skip("refngd.nn has no Conv2d yet")
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    theta = model.init(rng)
    X = rng.standard_normal((4, 2, 6, 5))
    return model, theta, X


# ---------------------------------------------------------------- input shapes
@pytest.mark.parametrize("shape,match", [
    ((5, 4), r"layer 0: Linear\(3, 4, bias=True\) expects per-sample input shape \(3,\) \(or \(T, 3\) for sequences\), got \(4,\)"),
    ((5, 3, 1), r"expects per-sample input shape \(3,\).*, got \(3, 1\); add a Flatten\(\)"),
    ((3,), r"X must be a batch of shape \(N, \.\.\.\)"),
    ((0, 3), r"N >= 1"),
])
def test_linear_wrong_input_shape(mlp, shape, match):
    model, theta, _, _ = mlp
    with pytest.raises(ValueError, match=match):
        model.forward(theta, np.ones(shape))
    with pytest.raises(ValueError, match=match):
        refngd.jacobian(model, theta, np.ones(shape))


@needs_conv
@pytest.mark.parametrize("shape,match", [
    ((4, 3, 6, 5), r"layer 0: Conv2d\(2, 3.*expects per-sample input shape \(2, H, W\)"),
    ((4, 6, 5), r"layer 0: Conv2d.*expects per-sample input shape \(2, H, W\)"),
    ((4, 2, 7, 7), r"layer 3: Linear\(27, 2, bias=True\) expects per-sample input shape \(27,\)"),
    ((4, 2, 1, 1), r"empty output"),
])
def test_conv_wrong_input_shape(cnn, shape, match):
    model, theta, _ = cnn
    if shape == (4, 2, 1, 1):  # k=3, p=1 fits a 1×1 input; use an unpadded conv instead
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
        theta = model.init(np.random.default_rng(0))
    with pytest.raises(ValueError, match=match):
        model.forward(theta, np.ones(shape))


@needs_conv
def test_conv_model_without_flatten():
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    theta = model.init(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"refngd needs \(C,\): end with Flatten\(\)"):
        model.forward(theta, np.ones((2, 2, 5, 5)))


# ---------------------------------------------------------------- θ
def test_theta_wrong_length(mlp):
    model, theta, X, y = mlp
    for bad in (theta[:-1], np.concatenate([theta, [0.0]])):
        with pytest.raises(ValueError, match=rf"theta has {bad.size} entries but the model has {theta.size} parameters"):
            model.forward(bad, X)
        with pytest.raises(ValueError, match="theta has"):
            refngd.gradient(model, bad, CrossEntropy(), X, y)


@pytest.mark.parametrize("make", [lambda t: t[None, :], lambda t: t.reshape(-1, 2), lambda t: np.array(1.0)])
def test_theta_not_1d(mlp, make):
    model, theta, X, _ = mlp
    with pytest.raises(ValueError, match="theta must be 1-dimensional"):
        model.forward(make(theta), X)


@pytest.mark.parametrize("which", ["theta", "X"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool, np.float16, np.complex128, object])
def test_non_float_arrays(mlp, which, dtype):
    model, theta, X, _ = mlp
    args = {"theta": theta, "X": X}
    args[which] = args[which].astype(dtype)
    with pytest.raises(TypeError, match=rf"{which} has dtype .*float64 \(default\) or float32"):
        refngd.jacobian(model, args["theta"], args["X"])


@pytest.mark.parametrize("which", ["theta", "X"])
def test_lists_are_not_arrays(mlp, which):
    model, theta, X, _ = mlp
    args = {"theta": theta, "X": X}
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"{which} must be an array, got list"):
        model.forward(args["theta"], args["X"])


@pytest.mark.parametrize("which", ["theta", "X"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_inputs(mlp, which, bad):
    model, theta, X, y = mlp
    args = {"theta": theta.copy(), "X": X.copy()}
    args[which].flat[1] = bad
    with pytest.raises(ValueError, match=rf"{which} contains NaN or Inf"):
        model.forward(args["theta"], args["X"])
    with pytest.raises(ValueError, match=rf"{which} contains NaN or Inf"):
        refngd.per_sample_gradients(model, args["theta"], CrossEntropy(), args["X"], y)


def test_overflowing_outputs_raise(mlp):
    model, theta, X, y = mlp
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(ValueError, match="model outputs contain NaN or Inf"):
            model.forward(theta * 1e300, X)
        with pytest.raises(ValueError, match=r"model outputs contain NaN or Inf \(overflow in float32\)"):
            model.forward((theta * 1e30).astype(np.float32), (X * 1e10).astype(np.float32))


# ---------------------------------------------------------------- targets
@pytest.mark.parametrize("loss,y,exc,match", [
    (CrossEntropy(), np.array([0, 1, 0, 1]), ValueError, r"batch size mismatch: Z has N = 5 rows but y has shape \(4,\)"),
    (CrossEntropy(), np.array([0, 1, 2, 1, 0]), ValueError, r"labels must lie in \[0, C\) = \[0, 2\)"),
    (CrossEntropy(), np.array([0, -1, 1, 1, 0]), ValueError, r"labels must lie in \[0, C\)"),
    (CrossEntropy(), np.array([0.0, 1, 1, 1, 0]), TypeError, r"labels must be integers"),
    (CrossEntropy(), np.eye(2)[[0, 1, 1, 0, 0]], ValueError, r"for one-hot targets pass y.argmax\(axis=1\)"),
    (MSELoss(), np.ones((6, 2)), ValueError, r"batch size mismatch"),
    (MSELoss(), np.ones((5, 3)), ValueError, r"same shape as Z, \(5, 2\), got \(5, 3\)"),
    (MSELoss(), np.ones(10), ValueError, r"batch size mismatch"),
    (MSELoss(), np.ones((5, 2), dtype=int), TypeError, r"targets y must be floats"),
    (MSELoss(), np.full((5, 2), np.nan), ValueError, r"targets y contain NaN or Inf"),
    (BCEWithLogits(), np.full((5, 2), 1.5), ValueError, r"targets must lie in \[0, 1\]"),
    (BCEWithLogits("sum"), np.ones((4, 2)), ValueError, r"batch size mismatch"),
])
def test_bad_targets(mlp, loss, y, exc, match):
    model, theta, X, _ = mlp
    for fn in (refngd.gradient, refngd.per_sample_gradients, refngd.loss_value):
        with pytest.raises(exc, match=match):
            fn(model, theta, loss, X, y)


def test_loss_class_instead_of_instance(mlp):
    model, theta, X, y = mlp
    with pytest.raises(TypeError, match=r"pass a loss instance, e.g. CrossEntropy\(\)"):
        refngd.gradient(model, theta, CrossEntropy, X, y)
    with pytest.raises(TypeError, match="loss must be a refngd.losses loss"):
        refngd.per_sample_gradients(model, theta, "cross_entropy", X, y)


def test_not_a_model(mlp):
    _, theta, X, _ = mlp
    with pytest.raises(TypeError, match="model must be a refngd.nn.Sequential or a refngd.FunctionModel"):
        refngd.jacobian(lambda t, x: x, theta, X)


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        CrossEntropy("none")


# ---------------------------------------------------------------- cotangents and vectors
@pytest.mark.parametrize("shape", [(5, 2), (4, 1, 2), (5, 1, 3), (5, 1, 2, 1), (1, 5, 2)])
def test_backprop_wrong_cotangent_shape(mlp, shape):
    model, theta, X, _ = mlp
    lin = model.linearize(theta, X)
    with pytest.raises(ValueError, match=r"cotangents must have shape \(N, K, C\) = \(5, K, 2\)"):
        lin.backprop(np.ones(shape))


def test_backprop_bad_cotangent_values(mlp):
    model, theta, X, _ = mlp
    lin = model.linearize(theta, X)
    with pytest.raises(TypeError, match="cotangents has dtype int64"):
        lin.backprop(np.ones((5, 1, 2), dtype=int))
    with pytest.raises(TypeError, match="cotangents must be an array"):
        lin.backprop([[[1.0, 0.0]]] * 5)
    with pytest.raises(ValueError, match="cotangents contains NaN or Inf"):
        lin.backprop(np.full((5, 1, 2), np.nan))


def test_function_model_wrong_cotangent_shape(mlp):
    _, _, X, _ = mlp
    fm = refngd.FunctionModel(lambda t, x: x @ t.reshape(3, 2), np.zeros(6))
    with pytest.raises(ValueError, match=r"cotangents must have shape \(N, K, C\) = \(5, K, 2\)"):
        fm.linearize(np.ones(6), X).backprop(np.ones((5, 2)))
    with pytest.raises(ValueError, match="theta has 5 entries, the model has 6"):
        refngd.jacobian(fm, np.ones(5), X)
    bad = refngd.FunctionModel(lambda t, x: x @ t, np.zeros(3))
    with pytest.raises(ValueError, match=r"f must return outputs of shape \(N, C\)"):
        refngd.jacobian(bad, np.ones(3), X)


def test_jvp_vjp_bad_vectors(mlp):
    model, theta, X, _ = mlp
    with pytest.raises(ValueError, match=r"v must have theta's shape \(26,\), got \(3,\)"):
        refngd.jvp(model, theta, X, np.ones(3))
    with pytest.raises(TypeError, match="v has dtype int64"):
        refngd.jvp(model, theta, X, np.ones(theta.size, dtype=int))
    with pytest.raises(ValueError, match="v contains NaN or Inf"):
        refngd.jvp(model, theta, X, np.full(theta.size, np.nan))
    with pytest.raises(ValueError, match=r"w must have the output shape \(5, 2\), got \(5, 3\)"):
        refngd.vjp(model, theta, X, np.ones((5, 3)))
    with pytest.raises(ValueError, match="w must be 2-dimensional"):
        refngd.vjp(model, theta, X, np.ones(5))


def test_model_without_parameters(mlp):
    _, _, X, _ = mlp
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="this model has no parameters to differentiate"):
        refngd.jacobian(model, np.zeros(0), X)


# ---------------------------------------------------------------- mixing arrays
def test_theta_from_another_model(mlp):
    model, _, X, _ = mlp
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="theta has 32 entries but the model has 26"):
        model.forward(other.init(np.random.default_rng(0)), X)


def test_cotangents_from_another_batch(mlp):
    model, theta, X, _ = mlp
    rows_other = np.ones((3, 1, 2))  # built for a batch of 3
    with pytest.raises(ValueError, match=r"\(N, K, C\) = \(5, K, 2\), got \(3, 1, 2\)"):
        model.linearize(theta, X).backprop(rows_other)


def test_numpy_and_cupy_arrays_do_not_mix(monkeypatch):
    """namespace() refuses a mix of NumPy and CuPy arrays (simulated with a stand-in type)."""

    class FakeCupyArray:
        dtype = np.dtype(np.float64)

    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=FakeCupyArray))
    with pytest.raises(TypeError, match="mix of NumPy and CuPy arrays"):
        backend.namespace(np.ones(3), FakeCupyArray())
    assert backend.namespace(FakeCupyArray(), None, 1.0) is backend._cupy


def test_float32_theta_casts_float64_data(mlp):
    """Not an error: computation runs in θ's dtype and X is cast (docs/conventions.md)."""
    model, theta, X, _ = mlp
    assert model.forward(theta.astype(np.float32), X).dtype == np.float32


# ---------------------------------------------------------------- layer construction
@pytest.mark.parametrize("args", [(0, 3), (3, 0), (-1, 3), (0, 0)])
def test_linear_bad_sizes(args):
    with pytest.raises(ValueError, match="Linear needs in_features >= 1 and out_features >= 1"):
        nn.Linear(*args)


@needs_conv
@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=0, out_channels=3, kernel_size=3), "in_channels >= 1 and out_channels >= 1"),
    (dict(in_channels=1, out_channels=0, kernel_size=3), "in_channels >= 1 and out_channels >= 1"),
    (dict(in_channels=1, out_channels=3, kernel_size=0), "kernel_size must be >= 1"),
    (dict(in_channels=1, out_channels=3, kernel_size=3, stride=0), "stride must be >= 1"),
    (dict(in_channels=1, out_channels=3, kernel_size=3, padding=-1), "padding must be >= 0"),
    (dict(in_channels=1, out_channels=3, kernel_size=3, dilation=0), "dilation must be >= 1"),
    (dict(in_channels=1, out_channels=3, kernel_size=(3, 3, 3)), "kernel_size must be an int or a pair of ints"),
    (dict(in_channels=1, out_channels=3, kernel_size=2.5), "kernel_size must be an int or a pair of ints"),
])
def test_conv_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nn.Conv2d(**kwargs)


def test_bad_sequential_and_activation():
    with pytest.raises(ValueError, match="Sequential needs at least one layer"):
        nn.Sequential()
    with pytest.raises(TypeError, match="layer 1 .* is not a refngd.nn layer"):
        nn.Sequential(nn.Linear(2, 2), lambda x: x)
    with pytest.raises(ValueError, match="GELU approximate must be 'none' or 'tanh'"):
        nn.GELU("fast")


def test_bad_init_arguments(mlp):
    model = mlp[0]
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator .* or an int seed"):
        model.init(0.5)
    with pytest.raises(TypeError, match="or an int seed, got bool"):
        model.init(True)
    # an int seed is accepted, as by every other function that takes rng (issue 21)
    assert np.array_equal(model.init(0), model.init(np.random.default_rng(0)))
    for dtype in ("int32", "float16"):
        with pytest.raises(TypeError, match="dtype must be float64 \\(default\\) or float32"):
            model.init(np.random.default_rng(0), dtype=dtype)
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        model.init(np.random.default_rng(0), backend="jax")


def test_unflatten_flatten_mismatch(mlp):
    model, theta, _, _ = mlp
    with pytest.raises(ValueError, match="theta has 3 entries but the model has 26"):
        model.unflatten(theta[:3])
    with pytest.raises(ValueError, match="this model has no parameters"):
        model.flatten([])


def test_bad_damping():
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="damping must be finite and >= 0"):
            backend.check_damping(bad)
    with pytest.raises(TypeError, match="damping must be a real number"):
        backend.check_damping("0.1")
    with pytest.raises(ValueError, match="damping must be > 0 here"):
        backend.check_damping(0.0, allow_zero=False)


def test_more_bad_inputs_raise_clear_errors():
    """Checks added after review: each of these used to pass silently."""
    import autograd.numpy as anp

    from refngd import FunctionModel, nn
    from refngd.curvature import EmpiricalFisher, SampledFisher
    from refngd.losses import CrossEntropy
    from refngd.optim.train import dataset_metrics

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    theta, X, y = model.init(rng), rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    loss = CrossEntropy()
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        SampledFisher(model, theta, loss, X, y, mc_samples=2.0, rng=0)
    F = EmpiricalFisher(model, theta, loss, X, y)
    w0 = np.ones((5, 1))
    w0[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.solve_row_space(w0, 0.1)
    with pytest.raises(ValueError, match="at least one sample"):
        dataset_metrics(model, theta, loss, X[:0], y[:0])

    def f(t, X):
        return anp.dot(X, t.reshape(3, 2))

    fm = FunctionModel(f, np.zeros(6))
    with pytest.raises(TypeError, match="dtype float32"):
        fm.forward(np.zeros(6, dtype=np.float32), X)
    with pytest.raises(ValueError, match="NaN or Inf"):
        FunctionModel(lambda t, X: anp.log(anp.dot(X, t.reshape(3, 2)) * 0.0), np.ones(6)).forward(np.ones(6), X)

"""Parameter subsets (``params=``): the curvature of a subset S is the submatrix F[S, S].

* every exact curvature (Fisher, sampled, empirical, improved empirical) on LoRA, last-layer,
  first-and-last and partial-layer subsets of an MLP and a CNN equals the submatrix of a
  dense Fisher built from HIPS autograd Jacobians of the network written anew — through
  ``dense()``, ``@``, ``gram()``, ``diagonal()``, ``trace()``, ``solve()`` (both the R × R
  and the P × P route) and the gradient;
* K-FAC, EKFAC and the Kronecker diagonal on a subset equal the submatrix of their full
  operator; every update on a subset equals the dense solve on the subset;
* frozen tensors cost no row work: their row primitives are never called (instrumented),
  layers below the first selected one are not back-propagated through;
* bad selections give clear errors.
"""
from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from numerics import assert_close, assert_row_primitives, unpack
from devices import gpu_available
from layer_oracles import Scale

import refngd
from refngd import nn, updates
from refngd.curvature import (EKFAC, KFAC, EmpiricalFisher, Fisher, ImprovedEmpiricalFisher,
                              KroneckerDiagonal, SampledFisher)
from refngd.losses import CrossEntropy, MSELoss
from refngd.subsets import ParamSubset, peft_mask, resolve_params

EXACT = 1e-10
SF_SEED, SF_K = 5, 3


# ------------------------------------------------------------------------- problems
def mlp(N):
    """Linear → Tanh → LoRALinear (rank 2, α = 4) → Tanh → Linear, written twice."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LoRALinear(5, 6, rank=2, alpha=4.0),
                          nn.Tanh(), nn.Linear(6, 3))
    shapes = [(5, 4), (5,), (6, 5), (6,), (2, 5), (6, 2), (3, 6), (3,)]

    def f(theta, X):
        W1, b1, W0, b0, A, B, W3, b3 = unpack(theta, shapes)
        h = anp.tanh(anp.dot(X, W1.T) + b1)
        h = anp.tanh(anp.dot(h, W0.T) + b0 + 2.0 * anp.dot(anp.dot(h, A.T), B.T))  # s = 4/2
        return anp.dot(h, W3.T) + b3

    rng = np.random.default_rng(0)
    theta = model.init(rng)
    theta = theta + 0.3 * rng.standard_normal(theta.shape)  # B ≠ 0, else A's rows vanish
    X = rng.standard_normal((N, 4))
    return model, f, theta, X


def cnn(N):
    """Conv2d → Tanh → Flatten → LoRALinear (rank 2, α = 1) → Tanh → Linear."""
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(),
                          nn.LoRALinear(12, 4, rank=2, alpha=1.0), nn.Tanh(), nn.Linear(4, 3))
    shapes = [(3, 2, 2, 2), (3,), (4, 12), (4,), (2, 12), (4, 2), (3, 4), (3,)]

    def f(theta, X):
        W, b, W0, b0, A, B, W3, b3 = unpack(theta, shapes)
        out = b[None, :, None, None]
        for a in range(2):
            for e in range(2):
                out = out + anp.einsum("oc,ncij->noij", W[:, :, a, e], X[:, :, a:a + 2, e:e + 2])
        h = anp.reshape(anp.tanh(out), (X.shape[0], -1))
        h = anp.tanh(anp.dot(h, W0.T) + b0 + 0.5 * anp.dot(anp.dot(h, A.T), B.T))
        return anp.dot(h, W3.T) + b3

    rng = np.random.default_rng(1)
    theta = model.init(rng)
    theta = theta + 0.3 * rng.standard_normal(theta.shape)
    X = rng.standard_normal((N, 2, 3, 3))
    return model, f, theta, X


PROBLEMS = {"mlp": mlp, "cnn": cnn}


def tensor_mask(model, select):
    """Boolean θ mask from {layer index: tensor flags}."""
    m = np.zeros(model.num_params, bool)
    for i, flags in select.items():
        pos = model.slices[i][0]
        for shape, on in zip(model.layers[i].param_shapes, flags):
            size = int(np.prod(shape))
            m[pos:pos + size] = on
            pos += size
    return m


def masks(model):
    """The subsets under test, by name (``None``: the model's default, all but the LoRA base)."""
    last = len(model.layers) - 1
    lora = next(i for i, l in enumerate(model.layers) if isinstance(l, nn.LoRALinear))
    return {
        "lora": peft_mask(model),
        "default": None,
        "last_layer": [last],
        "first_and_last": [0, last],
        "lora_A_and_first_weight": tensor_mask(model, {0: (True, False), lora: (False, False, True, False)}),
        "bias_only": tensor_mask(model, {0: (False, True), last: (False, True)}),
        "base_and_B": tensor_mask(model, {lora: (True, True, False, True)}),
    }


KRON_MASKS = ["lora", "default", "last_layer", "first_and_last", "lora_A_and_first_weight", "base_and_B"]
LOSSES = [("ce_mean", lambda: CrossEntropy("mean")), ("mse_sum", lambda: MSELoss("sum"))]


def dense_reference(f, theta, X, y, loss):
    """Full F, SF, EF, iEF and g from autograd Jacobians J (N, C, P) and the loss's H, e."""
    J = autograd.jacobian(lambda t: f(t, X))(theta)
    Z = f(theta, X)
    N, C = Z.shape
    c = 1.0 if loss.reduction == "sum" else (1.0 / N if isinstance(loss, CrossEntropy) else 1.0 / (N * C))
    H, E = loss.output_hessian(Z), loss.output_gradient(Z, y)
    G = np.einsum("ncp,nc->np", J, E)
    Eh = loss.sampled_output_gradients(Z, np.random.default_rng(SF_SEED), SF_K)
    Gh = np.einsum("ncp,nkc->nkp", J, Eh)
    s = (E * E).sum(1)
    return dict(J=J, G=G, s=s, c=c, g=c * G.sum(0),
                Fisher=c * np.einsum("nap,nab,nbq->pq", J, H, J),
                SampledFisher=c / SF_K * np.einsum("nkp,nkq->pq", Gh, Gh),
                EmpiricalFisher=c * G.T @ G,
                ImprovedEmpiricalFisher=c * (G / s[:, None]).T @ G)


def targets(loss, rng, N, C=3):
    return rng.integers(0, C, N) if isinstance(loss, CrossEntropy) else rng.standard_normal((N, C))


def build(cls, model, theta, loss, X, y, params, **kw):
    if cls is SampledFisher:
        kw = dict(kw, mc_samples=SF_K, rng=np.random.default_rng(SF_SEED))
    return cls(model, theta, loss, X, y, params=params, **kw)


# ================================================================ exact curvatures
@pytest.mark.parametrize("N", [6, 16], ids=["gram_route", "dense_route"])
@pytest.mark.parametrize("lname,make_loss", LOSSES, ids=[n for n, _ in LOSSES])
@pytest.mark.parametrize("kind", PROBLEMS)
def test_exact_subset_is_submatrix_of_autograd_fisher(kind, lname, make_loss, N):
    model, f, theta, X = PROBLEMS[kind](N)
    loss = make_loss()
    y = targets(loss, np.random.default_rng(7), N)
    ref = dense_reference(f, theta, X, y, loss)
    rng = np.random.default_rng(3)
    for name, params in masks(model).items():
        S = resolve_params(model, params).mask
        PS = int(S.sum())
        for cls in (Fisher, SampledFisher, EmpiricalFisher, ImprovedEmpiricalFisher):
            Fs = ref[cls.__name__][np.ix_(S, S)]
            op = build(cls, model, theta, loss, X, y, params)
            assert op.shape == (PS, PS), (name, cls.__name__)
            assert_close(op.dense(), Fs)
            v = rng.standard_normal(PS)
            assert_close(op @ v, Fs @ v)
            assert_close(op.diagonal(), np.diag(Fs))
            assert abs(op.trace() - np.trace(Fs)) <= EXACT * abs(np.trace(Fs))
            assert_close(op.gradient(), ref["g"][S])
            U = op.row_matrix()  # rows of θ[S] only; their Gram matrix is the subset's
            assert_close(op.gram(), U @ U.T)
            if cls is Fisher:  # rows s_nkᵀ J_n[:, S] from the autograd Jacobian
                Uref = np.einsum("nck,ncp->nkp", loss.hessian_factor(f(theta, X), y),
                                 ref["J"][:, :, S]).reshape(U.shape)
                assert_close(U, Uref)
                assert_close(op.gram(), Uref @ Uref.T)
            lam = 1e-2 * np.trace(Fs) / PS
            assert_close(op.solve(v, lam), np.linalg.solve(Fs + lam * np.eye(PS), v), 1e-9)
            assert_close(op.natural_gradient(lam),
                         np.linalg.solve(Fs + lam * np.eye(PS), ref["g"][S]), 1e-9)


def test_default_mask_is_the_adapters_and_all_is_everything():
    model, _, theta, X = mlp(5)
    lora = model.layers[2]
    assert lora.trainable == (False, False, True, True)
    m = model.trainable_mask()  # everything but the LoRA base (W₀: 30, b₀: 6 entries)
    assert m.sum() == model.num_params - 36 and not m[25:61].any()
    p = peft_mask(model)  # the adapters only (A: 10, B: 12 entries)
    assert p.nonzero()[0].tolist() == list(range(25 + 36, 25 + 36 + 22))
    assert resolve_params(model, "all") is None
    assert resolve_params(model, np.ones(model.num_params, bool)) is None
    y = np.arange(5) % 3
    F_all = Fisher(model, theta, CrossEntropy(), X, y, params="all")
    assert F_all.shape == (model.num_params,) * 2
    # a model without frozen layers: params=None is all of θ, as before
    plain = nn.Sequential(nn.Linear(4, 3))
    assert resolve_params(plain, None) is None


@pytest.mark.parametrize("kind", PROBLEMS)
def test_function_model_subset(kind):
    """FunctionModel: any boolean mask (even a split tensor) selects columns of U."""
    model, f, theta, X = PROBLEMS[kind](5)
    fm = refngd.FunctionModel(f, theta)
    loss = CrossEntropy()
    y = targets(loss, np.random.default_rng(2), 5)
    ref = dense_reference(f, theta, X, y, loss)
    S = np.zeros(theta.size, bool)
    S[3:17] = True
    S[-5:] = True
    F = Fisher(fm, theta, loss, X, y, params=S)
    assert_close(F.dense(), ref["Fisher"][np.ix_(S, S)])
    assert_close(F.gradient(), ref["g"][S])
    with pytest.raises(TypeError, match="layer indices need a refngd.nn.Sequential"):
        Fisher(fm, theta, loss, X, y, params=[0])


# ================================================================ K-FAC family
@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("kind", PROBLEMS)
def test_kronecker_subset_is_submatrix(kind, bias):
    """K-FAC / Kronecker diagonal: submatrix of the full operator for every subset; EKFAC
    too, except where a layer's weight is selected without its bias under ``bias="joint"``
    (EKFAC's joint eigenbasis mixes W and b; the subset uses the weight's own)."""
    model, _, theta, X = PROBLEMS[kind](6)
    loss = CrossEntropy()
    y = targets(loss, np.random.default_rng(4), 6)
    lin = model.linearize(theta, X)
    all_ = masks(model)
    for cls in (KFAC, EKFAC, KroneckerDiagonal):
        full = cls(model, theta, loss, X, y, bias=bias, params="all", linearization=lin).dense()
        for name in KRON_MASKS:
            params = all_[name]
            S = resolve_params(model, params).mask
            op = cls(model, theta, loss, X, y, bias=bias, params=params, linearization=lin)
            if cls is EKFAC and bias == "joint" and name == "lora_A_and_first_weight":
                continue
            assert_close(op.dense(), full[np.ix_(S, S)])
            v = np.random.default_rng(1).standard_normal(int(S.sum()))
            assert_close(op @ v, full[np.ix_(S, S)] @ v)
            assert_close(op.solve(v, 0.1), np.linalg.solve(full[np.ix_(S, S)] + 0.1 * np.eye(S.sum()), v),
                         1e-9)


def test_ekfac_weight_only_joint_is_ekfac_of_the_weight():
    """bias="joint" with the bias frozen: the weight's K-FAC block is the submatrix G ⊗ A[:D, :D]
    of the joint one, and EKFAC's diagonal is re-estimated in that block's eigenbasis, i.e. it
    equals EKFAC with bias="separate" on the same subset."""
    model, _, theta, X = mlp(6)
    loss = CrossEntropy()
    y = targets(loss, np.random.default_rng(4), 6)
    S = tensor_mask(model, {0: (True, False)})
    a = EKFAC(model, theta, loss, X, y, bias="joint", params=S).dense()
    b = EKFAC(model, theta, loss, X, y, bias="separate", params=S).dense()
    assert_close(a, b)


def test_lora_kfac_is_exact_for_one_sample():
    """N = 1: A = ā āᵀ has rank one, so every K-FAC block G ⊗ A equals the exact Fisher block
    (Martens & Grosse 2015, §3); for the LoRA adapters this checks their factors' inputs
    (a, s·A a) and rows (s·Bᵀb, b) against autograd."""
    model, f, theta, X = mlp(1)
    loss = CrossEntropy()
    y = np.array([1])
    ref = dense_reference(f, theta, X[:1], y, loss)["Fisher"]
    lora = model.slices[2][0] + 30 + 6
    for lo, hi in [(lora, lora + 10), (lora + 10, lora + 22)]:  # A's block, then B's
        S = np.zeros(model.num_params, bool)
        S[lo:hi] = True
        K = KFAC(model, theta, loss, X[:1], y, params=S).dense()
        assert_close(K, ref[np.ix_(S, S)])


def test_kfac_refuses_bias_without_weight():
    model, _, theta, X = mlp(4)
    y = np.arange(4) % 3
    with pytest.raises(ValueError, match="K-FAC needs a layer's weight"):
        KFAC(model, theta, CrossEntropy(), X, y, params=masks(model)["bias_only"])


# ================================================================ updates
@pytest.mark.parametrize("kind", PROBLEMS)
def test_updates_on_subsets_are_dense_subset_solves(kind):
    model, f, theta, X = PROBLEMS[kind](6)
    loss = CrossEntropy()
    y = targets(loss, np.random.default_rng(8), 6)
    ref = dense_reference(f, theta, X, y, loss)
    lam = 1e-3
    for name, params in masks(model).items():
        S = resolve_params(model, params).mask
        I = np.eye(int(S.sum()))
        gS, GS, s, c = ref["g"][S], ref["G"][:, S], ref["s"], ref["c"]

        def solve(key):
            return np.linalg.solve(ref[key][np.ix_(S, S)] + lam * I, gS)

        assert_close(updates.sgd(model, theta, loss, X, y, params=params), gS)
        assert_close(updates.ngd(model, theta, loss, X, y, lam, params=params), solve("Fisher"), 1e-9)
        assert_close(updates.sf(model, theta, loss, X, y, lam, mc_samples=SF_K,
                                rng=np.random.default_rng(SF_SEED), params=params),
                     solve("SampledFisher"), 1e-9)
        assert_close(updates.ef(model, theta, loss, X, y, lam, form="tikhonov", params=params),
                     solve("EmpiricalFisher"), 1e-9)
        assert_close(updates.ief(model, theta, loss, X, y, lam, form="tikhonov", params=params),
                     solve("ImprovedEmpiricalFisher"), 1e-9)
        # the paper's forms: Gᵀ(GGᵀ + λI)⁻¹ 1 and Gᵀ(GGᵀ + λI)⁻¹ s with the subset's G
        K = GS @ GS.T + lam * np.eye(6)
        assert_close(updates.ef(model, theta, loss, X, y, lam, form="gram", params=params),
                     GS.T @ np.linalg.solve(K, np.ones(6)), 1e-9)
        assert_close(updates.ief(model, theta, loss, X, y, lam, form="gram", params=params),
                     GS.T @ np.linalg.solve(K, s), 1e-9)
        if name == "bias_only":
            continue
        for fn, cls in ((updates.kfac, KFAC), (updates.ekfac, EKFAC)):
            Kd = cls(model, theta, loss, X, y, params=params).dense()
            assert_close(fn(model, theta, loss, X, y, lam, params=params),
                         np.linalg.solve(Kd + lam * I, gS), 1e-9)
        assert c > 0


def test_embed_and_select():
    model, _, theta, X = mlp(4)
    sub = resolve_params(model, [4])
    d = np.arange(sub.num_params, dtype=float) + 1
    full = sub.embed(d)
    assert full.shape == theta.shape and (full[~sub.mask] == 0).all()
    assert (sub.select(full) == d).all() and (theta[sub.mask] == sub.select(theta)).all()
    step = theta.copy()
    step[sub.mask] -= 0.1 * d
    assert_close(step, theta - 0.1 * full)
    with pytest.raises(ValueError, match="subset vector of length"):
        sub.embed(theta)
    with pytest.raises(ValueError, match="full length"):
        sub.select(d)


# ================================================================ no row work on frozen tensors
PRIMITIVES = ("row_gram", "row_dot", "row_sum", "row_grads", "row_sq_sum")


def expect_never_called(monkeypatch, obj, names):
    def boom(*a, **k):
        raise AssertionError(f"frozen {obj!r} did work")
    for n in names:
        monkeypatch.setattr(obj, n, boom)


@pytest.mark.parametrize("cls", [Fisher, EmpiricalFisher, KFAC, EKFAC, KroneckerDiagonal])
def test_frozen_tensors_do_no_row_work(cls, monkeypatch):
    """PEFT's LoRA subset: the frozen first layer and LoRA base never run a row primitive, the
    first layer is not even back-propagated through; the last (frozen) layer is, to reach the
    adapters.  Every operation of the operator then runs without touching them."""
    model, _, theta, X = mlp(5)
    loss = CrossEntropy()
    y = np.arange(5) % 3
    lin = model.linearize(theta, X)
    first, lora, last = model.layers[0], model.layers[2], model.layers[4]
    expect_never_called(monkeypatch, first, PRIMITIVES + ("backward",))
    expect_never_called(monkeypatch, lora.base, PRIMITIVES)
    expect_never_called(monkeypatch, last, PRIMITIVES)
    op = cls(model, theta, loss, X, y, linearization=lin, params=peft_mask(model))
    v = np.ones(op.shape[0])
    op.dense(), op @ v, op.diagonal(), op.solve(v, 0.1)
    if hasattr(op, "gram"):
        op.gram()
        op.natural_gradient(0.1)
    updates.ngd(model, theta, loss, X, y, 0.1, linearization=lin, params=peft_mask(model))


def test_backprop_stops_at_first_selected_layer(monkeypatch):
    model, _, theta, X = mlp(3)
    lin = model.linearize(theta, X)
    for layer in model.layers[:4]:
        expect_never_called(monkeypatch, layer, ("backward",))
    rows = lin.backprop(np.ones((3, 1, 3)), params=[4])
    assert [e.index for e in rows.layers] == [4] and rows.P == 21


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_only_rows(kind):
    """A layer restricted to its bias (``BiasRows``): rows summed over output positions."""
    rng = np.random.default_rng(6)
    if kind == "linear":
        layer, x, B = nn.Linear(4, 3), rng.standard_normal((5, 4)), rng.standard_normal((5, 2, 3))
    else:
        layer, x = nn.Conv2d(2, 3, 2), rng.standard_normal((5, 2, 4, 4))
        B = rng.standard_normal((5, 2, 3, 3, 3))
    params = [rng.standard_normal(s) for s in layer.param_shapes]
    _, cache = layer.forward(params, x)
    full = layer.row_grads(cache, B)
    nw = int(np.prod(layer.param_shapes[0]))
    bias_only = layer.restrict((False, True))
    assert isinstance(bias_only, nn.BiasRows)
    assert_row_primitives(bias_only, cache, B, full[:, :, nw:])
    weight_only = layer.restrict((True, False))
    assert_row_primitives(weight_only, cache, B, full[:, :, :nw])


# ================================================================ bad selections
def test_bad_masks_give_clear_errors():
    model, _, theta, X = mlp(4)
    y = np.arange(4) % 3
    P = model.num_params

    def fisher(params):
        return Fisher(model, theta, CrossEntropy(), X, y, params=params)

    with pytest.raises(ValueError, match=r"must have θ's shape \(%d,\)" % P):
        fisher(np.ones(P - 1, bool))
    with pytest.raises(TypeError, match="boolean mask"):
        fisher(np.ones(P))  # floats: neither a mask nor indices
    with pytest.raises(ValueError, match="selects no parameters"):
        fisher(np.zeros(P, bool))
    m = np.zeros(P, bool)
    m[:7] = True  # 7 of the 20 entries of the first weight
    with pytest.raises(ValueError, match="7 of the 20 entries of parameter tensor 0"):
        fisher(m)
    with pytest.raises(ValueError, match="out of range"):
        fisher([9])
    with pytest.raises(ValueError, match="has no parameters"):
        fisher([1])
    with pytest.raises(ValueError, match="'all'"):
        fisher("everything")
    with pytest.raises(ValueError, match="built for P"):
        fisher(resolve_params(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), [0]))
    with pytest.raises(ValueError, match="do not also pass"):
        EKFAC(model, theta, CrossEntropy(), X, y, kfac=KFAC(model, theta, CrossEntropy(), X, y),
              params=[4])
    with pytest.raises(ValueError, match="one bool per parameter tensor"):
        model.layers[0].trainable = (True,)


def test_layers_without_partial_support_refuse_partial_masks():
    """A layer that does not implement ``restrict`` accepts whole selections only."""
    model = nn.Sequential(Scale(3), nn.Linear(3, 2))
    m = np.zeros(model.num_params, bool)
    m[:3] = True
    with pytest.raises(ValueError, match="layer 0: Scale.*select all of them or none"):
        resolve_params(model, m)
    assert isinstance(resolve_params(model, [1]), ParamSubset)


# ================================================================ CuPy (skipped without a GPU)


@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
def test_subsets_on_cupy_match_numpy():
    import cupy

    from refngd.backend import to_numpy

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.PromptPrefix(2, 3), nn.Flatten(), nn.LoRALinear(15, 6, 2, 4.0),
                          nn.Tanh(), nn.Linear(6, 3))
    th = model.init(rng) + 0.1 * rng.standard_normal(model.num_params)
    X, y = rng.standard_normal((7, 3, 3)), rng.integers(0, 3, 7)
    m = peft_mask(model)
    loss = CrossEntropy()
    for params in (m, [4], "all"):
        for f in (lambda t, x, yy: Fisher(model, t, loss, x, yy, params=params).dense(),
                  lambda t, x, yy: updates.ngd(model, t, loss, x, yy, 1e-3, params=params),
                  lambda t, x, yy: updates.ief(model, t, loss, x, yy, 1e-3, params=params)):
            a = f(th, X, y)
            b = to_numpy(f(cupy.asarray(th), cupy.asarray(X), cupy.asarray(y)))
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    sub = resolve_params(model, m)
    d = cupy.arange(sub.num_params, dtype=cupy.float64)
    np.testing.assert_array_equal(to_numpy(sub.select(sub.embed(d))), to_numpy(d))

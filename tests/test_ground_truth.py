"""Exact natural gradients at every damping, against a 50-digit dense reference.

The reference takes the float64 network as given — its per-sample Jacobians J_n and its
outputs z_n, both exact binary numbers — and does everything else in 50-digit (mpmath)
arithmetic: the loss's p_n, H_n and e_n from z_n, F = c Σ_n J_nᵀ H_n J_n and
g = c Σ_n J_nᵀ e_n as dense P × P and P arrays, and (F + λI) d = g by LU.  For λ = 0 F is
singular (rank R < P) and d is the pseudo-inverse solution F⁺g, evaluated at high
precision as the Tikhonov limit F⁺g = lim_{δ→0} (F + δI)⁻¹g: with F and g formed at 90
digits, g lies in range(F) up to 1e-90, so δ = 1e-60 leaves an error far below 1e-20.

refngd's answer then differs from the reference only by its float64 round-off, amplified
by the conditioning of the R × R Gram matrix — not by 1/λ, which is what the Woodbury
route did (6e-5 relative at λ = 1e-12).
"""
from __future__ import annotations

import mpmath
import numpy as np
import pytest

import refngd
from refngd import nn, updates
from refngd.backend import SingularSystemError
from refngd.curvature import Fisher
from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss

DAMPINGS = [1e-2, 1e-7, 1e-12, 1e-16, 0.0]
TOL = 1e-10
DPS = 90  # ≥ 50 digits; 90 so that the λ = 0 limit below is exact to far below 1e-20


def _model(kind: str):
    if kind == "mlp":  # P = 3·4 + 4 + 4·3 + 3 = 31
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), (3,)
    # Conv2d(1, 1, 2) on 1×3×3 → 1×2×2 → Linear(4, 3): P = 4 + 1 + 12 + 3 = 20
    return nn.Sequential(nn.Conv2d(1, 1, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)), (1, 3, 3)


def _problem(kind: str, loss_name: str, N: int = 3, seed: int = 0, duplicate: bool = False):
    rng = np.random.default_rng(seed)
    model, shape = _model(kind)
    theta = model.init(rng) * 2.0  # larger weights: a less trivial, worse-conditioned Fisher
    X = rng.normal(size=(N,) + shape)
    if duplicate:
        X[-1] = X[0]
    loss = {"ce": CrossEntropy("mean"), "mse": MSELoss("sum"), "bce": BCEWithLogits("mean")}[loss_name]
    if loss_name == "ce":
        y = rng.integers(0, 3, N)
    elif loss_name == "mse":
        y = rng.normal(size=(N, 3))
    else:
        y = (rng.random((N, 3)) < 0.5).astype(float)
    if duplicate:
        y[-1] = y[0]
    return model, theta, loss, X, y


def _reference_system(model, theta, loss, X, y):
    """F and g at DPS digits from the float64 Jacobians and outputs (see the module docstring)."""
    J = refngd.jacobian(model, theta, X)                      # (N, C, P), float64
    Z = model.forward(theta, X)
    N, C, P = J.shape
    c = mpmath.mpf(1) / N if loss.reduction == "mean" else mpmath.mpf(1)
    if isinstance(loss, (MSELoss, BCEWithLogits)) and loss.reduction == "mean":
        c = mpmath.mpf(1) / (N * C)
    F = mpmath.zeros(P, P)
    g = mpmath.zeros(P, 1)
    for n in range(N):
        z = [mpmath.mpf(float(v)) for v in Z[n]]
        if isinstance(loss, CrossEntropy):
            m = max(z)
            ex = [mpmath.exp(v - m) for v in z]
            s = sum(ex)
            p = [v / s for v in ex]
            H = mpmath.matrix(C, C)
            for i in range(C):
                for j in range(C):
                    H[i, j] = (p[i] if i == j else 0) - p[i] * p[j]
            e = [p[i] - (1 if i == int(y[n]) else 0) for i in range(C)]
        elif isinstance(loss, MSELoss):
            H = 2 * mpmath.eye(C)
            e = [2 * (z[i] - mpmath.mpf(float(y[n, i]))) for i in range(C)]
        else:
            sig = [1 / (1 + mpmath.exp(-v)) for v in z]
            H = mpmath.diag([s_ * (1 - s_) for s_ in sig])
            e = [sig[i] - mpmath.mpf(float(y[n, i])) for i in range(C)]
        Jn = mpmath.matrix(J[n].tolist())
        F += Jn.T * (H * Jn)
        g += Jn.T * mpmath.matrix(e)
    return c * F, c * g


def _reference_solve(F, g, lam: float, dps: int = DPS):
    P = F.rows
    if lam > 0:
        with mpmath.workdps(dps):
            return np.array((mpmath.lu_solve(F + mpmath.mpf(lam) * mpmath.eye(P), g)).tolist(),
                            dtype=float)[:, 0]
    with mpmath.workdps(dps):  # F⁺g as the Tikhonov limit (module docstring), δ relative to F
        delta = mpmath.mpf("1e-60") * max(abs(F[i, j]) for i in range(P) for j in range(P))
        return np.array((mpmath.lu_solve(F + delta * mpmath.eye(P), g)).tolist(),
                        dtype=float)[:, 0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_ngd_matches_50_digit_reference_at_every_damping(kind, loss_name):
    model, theta, loss, X, y = _problem(kind, loss_name)
    with mpmath.workdps(DPS):
        F, g = _reference_system(model, theta, loss, X, y)
    R = Fisher(model, theta, loss, X, y).rows.R
    assert R < theta.size  # the Gram route
    for lam in DAMPINGS:
        d = updates.ngd(model, theta, loss, X, y, damping=lam)
        ref = _reference_solve(F, g, lam)
        assert _rel(d, ref) <= TOL, (lam, _rel(d, ref))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("gap", [40.0, 140.0, 600.0])
def test_saturated_softmax_at_every_damping(kind, gap):
    """Every sample's softmax saturated on class 0 (p_c ~ e^{−gap}: down to 1e-261), two
    samples labelled against it (p_y tiny, e_n = O(1)).  The factor pivoted at the largest
    class and aligned with e_n, and the solve scaled by √(max K_ii), keep every damping
    — including λ = 0, where F⁺g ~ 1e260 — at the reference's accuracy.  The reference
    needs more digits: p_0 = 1 − 1e-261 must be representable (hence 400)."""
    model, theta, loss, X, y = _problem(kind, "ce", N=4)
    theta = theta.copy()
    theta[-3:] += [gap, 0.0, 0.0]
    y = y.copy()
    y[0], y[2] = 1, 2
    dps = 400 if gap > 200 else 200
    with mpmath.workdps(dps):
        F, g = _reference_system(model, theta, loss, X, y)
    for lam in DAMPINGS + [1e3]:
        d = updates.ngd(model, theta, loss, X, y, damping=lam)
        ref = _reference_solve(F, g, lam, dps)
        scale = np.abs(ref).max()  # F⁺g ~ 1e260: norms of the scaled vectors
        assert _rel(d / scale, ref / scale) <= TOL, (lam, _rel(d / scale, ref / scale))


def test_saturated_float32_undamped_step_or_a_clear_overflow_error():
    """float32 rows of a saturated model: the undamped step F⁺g ~ e^{gap} keeps float32
    accuracy while it is representable (the solve is scaled by a power of two), and
    raises a clear error — never inf or NaN — where it is not (e^{86} ~ 2e37 · ‖J‖⁻²)."""
    model, theta, loss, X, y = _problem("mlp", "ce", N=4)
    theta = theta.copy()
    y = y.copy()
    y[0], y[2] = 1, 2
    for gap in (40.0, 80.0):
        th = theta.copy()
        th[-3:] += [gap, 0.0, 0.0]
        d64 = updates.ngd(model, th, loss, X, y, damping=0.0)
        d32 = updates.ngd(model, th.astype(np.float32), loss, X.astype(np.float32), y, damping=0.0)
        assert d32.dtype == np.float32 and np.all(np.isfinite(d32))
        assert _rel(d32.astype(float) / np.abs(d64).max(), d64 / np.abs(d64).max()) <= 1e-4, gap
    th = theta.copy()
    th[-3:] += [90.0, 0.0, 0.0]
    with pytest.raises(SingularSystemError, match="natural gradient at damping 0 overflows float32"), \
            np.errstate(over="ignore", invalid="ignore"):  # the inf it refuses to return
        updates.ngd(model, th.astype(np.float32), loss, X.astype(np.float32), y, damping=0.0)


def test_woodbury_solve_is_what_loses_accuracy():
    """The reason for the row-space route: Woodbury on the same g loses ~ε‖F‖/λ."""
    model, theta, loss, X, y = _problem("mlp", "ce")
    with mpmath.workdps(DPS):
        F, g = _reference_system(model, theta, loss, X, y)
    ref = _reference_solve(F, g, 1e-12)
    Fi = Fisher(model, theta, loss, X, y)
    assert _rel(Fi.natural_gradient(1e-12), ref) <= TOL
    assert _rel(Fi.solve(Fi.gradient(), 1e-12), ref) > 1e3 * _rel(Fi.natural_gradient(1e-12), ref)


@pytest.mark.parametrize("other_target", [False, True], ids=["same_target", "other_target"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_duplicate_samples_singular_gram(loss_name, kind, other_target):
    """K is singular: λ = 0 raises the clear error, every λ > 0 stays accurate.

    With another target for the duplicated input the gradient has a component along K's
    null vector (e_i − e_j)/√2; it must be dropped, not divided by λ/c (PSDFactor,
    ``projected``) — otherwise the error is ~ε‖F‖/λ, 0.4 at λ = 1e-16."""
    model, theta, loss, X, y = _problem(kind, loss_name, N=4, duplicate=True)
    if other_target:
        y = y.copy()
        y[-1] = (y[0] + 1) % 3 if loss_name == "ce" else (y[0][::-1] if loss_name == "mse" else 1 - y[0])
    with pytest.raises(SingularSystemError, match="pass damping > 0"):
        updates.ngd(model, theta, loss, X, y, damping=0.0)
    with mpmath.workdps(DPS):
        F, g = _reference_system(model, theta, loss, X, y)
    for lam in DAMPINGS[:-1]:
        d = updates.ngd(model, theta, loss, X, y, damping=lam)
        assert _rel(d, _reference_solve(F, g, lam)) <= TOL, lam


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_p_le_r_route_meets_its_stated_accuracy(loss_name):
    """P ≤ R: QR of [U; √(λ/c) I]; relative error ≲ ε·cond(F + λI) (docstring of solve_row_space).

    Cross-entropy makes F singular (softmax is shift-invariant), so small λ meets the
    bound rather than 1e-10, and λ = 0 raises; the MSE Fisher is well conditioned.
    """
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Linear(2, 3))            # P = 9
    theta = model.init(rng)
    X = rng.normal(size=(8, 2))                        # R ≥ 8·2 = 16 ≥ P
    y = rng.integers(0, 3, 8) if loss_name == "ce" else rng.normal(size=(8, 3))
    loss = CrossEntropy() if loss_name == "ce" else MSELoss()
    Fi = Fisher(model, theta, loss, X, y)
    assert Fi.rows.R >= theta.size
    with mpmath.workdps(DPS):
        F, g = _reference_system(model, theta, loss, X, y)
    w = np.linalg.eigvalsh(Fi.dense())
    for lam in DAMPINGS:
        cond = (w.max() + lam) / max(w.min() + lam, 0.0)
        if loss_name == "ce" and lam == 0:
            with pytest.raises(SingularSystemError, match="pass damping > 0"):
                updates.ngd(model, theta, loss, X, y, damping=lam)
            continue
        d = updates.ngd(model, theta, loss, X, y, damping=lam)
        bound = 10 * np.finfo(float).eps * cond
        assert _rel(d, _reference_solve(F, g, lam)) <= max(bound, TOL), (lam, cond)


def _saturated(loss_name):
    model, theta, loss, X, y = _problem("mlp", loss_name, N=4)
    # last layer bias (3 entries at the end of θ): drive one output's curvature to exactly 0
    theta = theta.copy()
    theta[-3:] = [-2000.0, 0.0, 0.0] if loss_name == "ce" else [1600.0, 0.0, -1600.0]
    if loss_name == "ce":
        y = y.copy()
        y[0] = 0  # p_0 = 0 in float64: e_0 lies outside range(H_0)
    else:
        y = y.copy()
        y[:, 0], y[:, 2] = 0.0, 1.0  # saturated on the wrong side: e = ±1 where H = 0
    return model, theta, loss, X, y


@pytest.mark.parametrize("loss_name", ["ce", "bce"])
def test_gradient_outside_range_of_underflowed_curvature(loss_name):
    """A curvature that underflowed to 0 gives no NaN; (F + λI) d = g holds for the float64 F."""
    model, theta, loss, X, y = _saturated(loss_name)
    Fi = Fisher(model, theta, loss, X, y)
    a, r = loss.gradient_in_factor(Fi.outputs, y)
    assert np.any(r != 0) and np.all(np.isfinite(a))
    g = Fi.gradient()
    for lam in (1e-2, 1e-7):
        d = updates.ngd(model, theta, loss, X, y, damping=lam)
        assert np.all(np.isfinite(d))
        expect = np.linalg.solve(Fi.dense() + lam * np.eye(theta.size), g)
        assert _rel(d, expect) <= 1e-8, lam


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_float32_model_stays_accurate_at_every_damping(loss_name):
    """Rows in float32, the Gram matrix and its factorisation in float64: float32 accuracy
    (≈ 1e-6 here) at every λ, where the Woodbury route in float32 would be off by ε₃₂‖F‖/λ."""
    model, theta, loss, X, y = _problem("mlp", loss_name)
    y32 = y.astype(np.float32) if y.dtype.kind == "f" else y
    for lam in DAMPINGS:
        d64 = updates.ngd(model, theta, loss, X, y, damping=lam)
        d32 = updates.ngd(model, theta.astype(np.float32), loss, X.astype(np.float32), y32, damping=lam)
        assert d32.dtype == np.float32
        assert _rel(d32.astype(float), d64) <= 1e-4, lam


@pytest.mark.parametrize("dtype,zs,tol", [
    (np.float64, [30.0, 700.0, 735.0, 744.0, 800.0, 1400.0, 1500.0], 1e-14),
    (np.float32, [30.0, 88.0, 95.0, 100.0, 102.0, 150.0, 170.0, 210.0], 1e-6)])
def test_gradient_in_factor_exact_where_the_variance_is_subnormal(dtype, zs, tol):
    """F_n a_n + r_n = e_n entrywise for BCE logits whose variance σσ(−z) is subnormal or 0
    (the factor is e^{−|z|/2}/(1 + e^{−|z|}), not √ of a subnormal) and for CE gaps."""
    loss = BCEWithLogits()
    Z = np.array([zs + [-z for z in zs]], dtype=dtype)
    for yv in (0.0, 1.0, 0.3):
        y = np.full_like(Z, yv)
        a, r = loss.gradient_in_factor(Z, y)
        assert np.all(np.isfinite(a)) and a.dtype == dtype
        implied = np.einsum("ncm,nm->nc", loss.hessian_factor(Z, y), a) + r
        e = loss.output_gradient(Z, y)
        assert np.all(np.abs(implied - e) <= tol * np.abs(e) + np.finfo(dtype).tiny), yv
    ce = CrossEntropy()
    for gap in ([0.0, 1.0, 2.0], [0.0, 700.0, 744.0], [0.0, 90.0, 103.0]):
        Zc = np.array([gap], dtype=dtype)
        for label in range(3):
            a, r = ce.gradient_in_factor(Zc, np.array([label]))
            implied = np.einsum("ncm,nm->nc", ce.hessian_factor(Zc, np.array([label])), a) + r
            e = ce.output_gradient(Zc, np.array([label]))
            assert np.all(np.isfinite(a))
            assert np.all(np.abs(implied - e) <= 50 * np.finfo(dtype).eps * np.abs(e).max()), (gap, label)


def test_gamma_star_closed_form_for_cross_entropy():
    """gᵀF⁺g = c‖a‖² and ‖Q_n[y, :]‖² = 1 − p_y give γ* = 1/√(c Σ_n (1 − p_{y_n})/p_{y_n})
    with no solve at all — an independent check of gradient_in_factor and of F⁺g."""
    from refngd.metrics import gamma

    model, theta, loss, X, y = _problem("mlp", "ce")
    Fi = Fisher(model, theta, loss, X, y)
    Z = model.forward(theta, X)
    p = np.exp(Z - Z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    py = p[np.arange(len(y)), y]
    expect = 1 / np.sqrt(Fi.c * np.sum((1 - py) / py))
    assert gamma(Fi.natural_gradient(0.0), Fi, Fi.gradient()) == pytest.approx(expect, rel=1e-10)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_ngd_at_every_damping_against_high_precision_woodbury(norm_first):
    """The tiny Transformer classifier (patch Linear → encoder block → LayerNorm → Flatten →
    Linear) under MSE (sum): with H_n = 2I the rows are U = √2·J exactly, so a 90-digit
    Woodbury solve (1/λ)(g − Uᵀ(λ/c·I + K)⁻¹U g) — λ = 0: (1/c)UᵀK⁻²U g — is an independent
    reference (another formula, at a precision where its cancellation is harmless)."""
    from test_transformer_curvature import transformer

    model, _, theta, X, _ = transformer(norm_first)
    y = np.random.default_rng(7).standard_normal((X.shape[0], 3))
    loss = MSELoss("sum")
    J = refngd.jacobian(model, theta, X)                           # (N, C, P), float64
    Z = model.forward(theta, X)
    N, C, P = J.shape
    with mpmath.workdps(DPS):
        U = mpmath.sqrt(2) * mpmath.matrix(J.reshape(N * C, P).tolist())
        e = mpmath.matrix([2 * (mpmath.mpf(float(Z[n, i])) - mpmath.mpf(float(y[n, i])))
                           for n in range(N) for i in range(C)])
        g = (U.T * e) / mpmath.sqrt(2)                              # c = 1: g = Σ_n J_nᵀ e_n
        K, Ug = U * U.T, U * g
        assert N * C < P
        for lam in DAMPINGS:
            if lam > 0:
                w = mpmath.lu_solve(K + mpmath.mpf(lam) * mpmath.eye(N * C), Ug)
                ref = (g - U.T * w) / mpmath.mpf(lam)
            else:
                ref = U.T * mpmath.lu_solve(K, mpmath.lu_solve(K, Ug))
            ref = np.array(ref.tolist(), dtype=float)[:, 0]
            d = updates.ngd(model, theta, loss, X, y, damping=lam)
            assert _rel(d, ref) <= TOL, (lam, _rel(d, ref))

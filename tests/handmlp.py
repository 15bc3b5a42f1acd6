"""A two-layer tanh MLP written out by hand, for the algorithm-box transcriptions.

z₁ = X W₁ᵀ + b₁, a₁ = tanh(z₁), z₂ = a₁ W₂ᵀ + b₂, softmax cross-entropy (mean or sum).
Everything here is plain NumPy: the forward pass, the per-sample output gradients
b_n = ∂l_n/∂z (back-propagated by hand), the batch gradient and K-FAC's joint-bias
factors A = (1/N) Σ ā āᵀ, G = c Σ b bᵀ — independent of refngd's layers and rows.
"""
import numpy as np

from refngd import nn
from refngd.losses import CrossEntropy


def make(seed=0, N=8, d=4, h=3, C=3, reduction="mean"):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C))
    theta = model.init(rng)
    X = rng.standard_normal((N, d))
    y = rng.integers(0, C, N)
    return model, theta, CrossEntropy(reduction=reduction), X, y


def unpack(theta, d, h, C):
    """(W₁, b₁, W₂, b₂) from θ in PyTorch order."""
    i = 0
    out = []
    for shape in ((h, d), (h,), (C, h), (C,)):
        n = int(np.prod(shape))
        out.append(theta[i:i + n].reshape(shape))
        i += n
    return out


def pack(W1, b1, W2, b2):
    return np.concatenate([W1.ravel(), b1, W2.ravel(), b2])


def pieces(theta, X, y, h, C, reduction="mean"):
    """Loss, per-layer inputs ā (with the 1), per-sample output grads b, c, gradient matrices."""
    N, d = X.shape
    W1, b1, W2, b2 = unpack(theta, d, h, C)
    z1 = X @ W1.T + b1
    a1 = np.tanh(z1)
    z2 = a1 @ W2.T + b2
    z2s = z2 - z2.max(axis=1, keepdims=True)
    p = np.exp(z2s) / np.exp(z2s).sum(axis=1, keepdims=True)
    ln = -np.log(p[np.arange(N), y])
    c = 1.0 / N if reduction == "mean" else 1.0
    e2 = p.copy()
    e2[np.arange(N), y] -= 1.0                      # ∂l_n/∂z₂
    e1 = (e2 @ W2) * (1.0 - a1**2)                  # ∂l_n/∂z₁
    abar = [np.hstack([X, np.ones((N, 1))]), np.hstack([a1, np.ones((N, 1))])]
    bs = [e1, e2]
    grads = [c * b.T @ a for b, a in zip(bs, abar)]  # [∇W | ∇b] per layer
    return dict(loss=c * ln.sum(), c=c, abar=abar, b=bs, grads=grads, p=p, z2=z2)


def grad_vector(grads):
    """θ-ordered gradient from the per-layer [∇W | ∇b] matrices."""
    return pack(grads[0][:, :-1], grads[0][:, -1], grads[1][:, :-1], grads[1][:, -1])


def kfac_factors(P):
    """Joint-bias K-FAC factors per layer: A = (1/N) Σ ā āᵀ, G = c Σ b bᵀ."""
    N = P["abar"][0].shape[0]
    return [(a.T @ a / N, P["c"] * b.T @ b) for a, b in zip(P["abar"], P["b"])]

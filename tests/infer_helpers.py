"""Tiny problems and a parser of infer's named scalars, shared by the infer tests."""
from __future__ import annotations

import numpy as np

from refngd import nn
from refngd.losses import CrossEntropy, MSELoss

N = 5


def mlp(loss="ce", seed=0):
    """Linear(3, 4) – Tanh – Linear(4, 3), N = 5."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    theta = model.init(rng)
    X = rng.standard_normal((N, 3))
    if loss == "ce":
        return model, theta, CrossEntropy(), X, rng.integers(0, 3, N), ("0", "2")
    return model, theta, MSELoss(), X, rng.standard_normal((N, 3)), ("0", "2")


def cnn(seed=0):
    """Conv2d(1, 2, 3, padding=1) on 4 × 4 (T = 16) – ReLU – Flatten – Linear(32, 3), N = 5."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32, 3))
    theta = model.init(rng)
    X = rng.standard_normal((N, 1, 4, 4))
    return model, theta, CrossEntropy(), X, rng.integers(0, 3, N), ("0", "3")


def value_of(name, sizes: dict, lam=None):
    """The number a name of infer stands for ("N^2*lambda", "(1-0.99)", "1/(N*T)", ...)."""
    env = dict(sizes)
    if lam is not None:
        env["lam"] = lam
        if isinstance(lam, tuple):
            env["lam_A"], env["lam_G"] = lam
    text = str(name).replace("^", "**").replace("lambda", "lam")  # `lambda` is a keyword
    return eval(text, {"__builtins__": {}}, env)  # noqa: S307


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

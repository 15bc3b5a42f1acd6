"""``refngd check`` end to end from files written here: exit 0 / 1 / 2 with clear messages."""
from __future__ import annotations

import json

import numpy as np
import pytest

from refngd import losses, nn
from refngd.cli import main
from refngd.curvature import KFAC, Fisher

ARCH = {"layers": [{"type": "Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3,
                    "padding": 1},
                   {"type": "ReLU"}, {"type": "Flatten"},
                   {"type": "Linear", "in_features": 32, "out_features": 3}],
        "loss": {"type": "CrossEntropyLoss", "reduction": "mean"}}


@pytest.fixture()
def files(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    theta = model.init(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((5, 1, 4, 4)), rng.integers(0, 3, 5)
    (tmp_path / "arch.json").write_text(json.dumps(ARCH))
    np.savez(tmp_path / "w.npz", theta=theta)
    np.savez(tmp_path / "batch.npz", X=X, y=y)
    paths = {k: str(tmp_path / f) for k, f in
             (("arch", "arch.json"), ("weights", "w.npz"), ("batch", "batch.npz"))}
    return tmp_path, paths, (model, theta, X, y)


def run(paths, cand, quantity, *extra):
    return main(["check", "--arch", paths["arch"], "--weights", paths["weights"], "--batch",
                 paths["batch"], "--candidate", cand, "--quantity", quantity, *extra])


def test_pass_and_mismatch(files, capsys):
    tmp, paths, (model, theta, X, y) = files
    F = Fisher(model, theta, losses.CrossEntropy(), X, y).dense()
    np.savez(tmp / "good.npz", candidate=F)
    assert run(paths, str(tmp / "good.npz"), "fisher") == 0
    assert "PASSED" in capsys.readouterr().out
    np.savez(tmp / "bad.npz", candidate=5 * F)
    assert run(paths, str(tmp / "bad.npz"), "fisher") == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "factor N = 5" in out


def test_kfac_factors_and_state_dict_keys(files, capsys):
    tmp, paths, (model, theta, X, y) = files
    K = KFAC(model, theta, losses.CrossEntropy(), X, y, kfac_approx="reduce")
    f0, f3 = K.factors()
    np.savez(tmp / "f.npz", **{"0.A": f0.A, "0.G": f0.G, "3.A": f3.A, "3.G": f3.G})
    blocks = model.unflatten(theta)
    np.savez(tmp / "sd.npz", **{"0.weight": blocks[0][0], "0.bias": blocks[0][1],
                                "3.weight": blocks[3][0], "3.bias": blocks[3][1]})
    paths = dict(paths, weights=str(tmp / "sd.npz"))
    assert run(paths, str(tmp / "f.npz"), "kfac_factors", "--kfac-approx", "reduce") == 0
    assert run(paths, str(tmp / "f.npz"), "kfac_factors") == 1
    assert "kfac_approx='reduce' where 'expand' was meant" in capsys.readouterr().out


def test_torch_state_dict(files):
    torch = pytest.importorskip("torch")
    tmp, paths, (model, theta, X, y) = files
    from refngd import interop

    torch.save(interop.to_torch(model, theta).state_dict(), tmp / "w.pt")
    np.savez(tmp / "g.npz", candidate=Fisher(model, theta, losses.CrossEntropy(), X, y).gradient())
    assert run(dict(paths, weights=str(tmp / "w.pt")), str(tmp / "g.npz"), "gradient") == 0
    # a pickled arbitrary object is refused by weights_only=True
    torch.save({"0.weight": object()}, tmp / "evil.pt")
    assert run(dict(paths, weights=str(tmp / "evil.pt")), str(tmp / "g.npz"), "gradient") == 2


@pytest.mark.parametrize("mutate,message", [
    (lambda t, p: dict(p, arch=str(t / "nope.json")), "does not exist"),
    (lambda t, p: ((t / "a.json").write_text("{"), dict(p, arch=str(t / "a.json")))[1], "not valid JSON"),
    (lambda t, p: ((t / "a.json").write_text(json.dumps({**ARCH, "layers": ARCH["layers"] + [{"type": "ConvTranspose2d"}]})),
                   dict(p, arch=str(t / "a.json")))[1], "unknown type 'ConvTranspose2d'"),
    (lambda t, p: ((t / "a.json").write_text(json.dumps({**ARCH, "loss": "NLLLoss"})),
                   dict(p, arch=str(t / "a.json")))[1], "must name one of"),
    (lambda t, p: (np.savez(t / "w2.npz", theta=np.zeros(7)), dict(p, weights=str(t / "w2.npz")))[1],
     "theta has 7 entries"),
    (lambda t, p: (np.savez(t / "b2.npz", X=np.zeros((2, 1, 4, 4))), dict(p, batch=str(t / "b2.npz")))[1],
     "needs arrays 'X' and 'y'"),
    (lambda t, p: (np.savez(t / "b3.npz", X=np.zeros((2, 3)), y=np.zeros(2, int)), dict(p, batch=str(t / "b3.npz")))[1],
     "does not fit the architecture"),
])
def test_bad_files_exit_2_with_one_clear_line(files, capsys, mutate, message):
    tmp, paths, (model, theta, X, y) = files
    np.savez(tmp / "c.npz", candidate=np.zeros(theta.size))
    assert run(mutate(tmp, paths), str(tmp / "c.npz"), "gradient") == 2
    err = capsys.readouterr().err
    assert err.startswith("refngd check: error:") and message in err


def test_usage_errors_exit_2(files):
    tmp, paths, _ = files
    with pytest.raises(SystemExit) as exc:
        main(["check", "--arch", paths["arch"]])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        run(paths, "c.npz", "hessian")
    assert exc.value.code == 2

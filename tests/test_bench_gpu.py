"""benchmarks/gpu.py: exits with a clear message without a GPU, and its code paths compute
the right numbers (run here with NumPy standing in for CuPy and PyTorch on the CPU).

No timing is asserted: the timer runs each function once.
"""
import os

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def gpu_script(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import gpu

    return gpu


def test_exits_with_a_message_without_cupy(gpu_script):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed: the script would run")
    except Exception:
        pass
    with pytest.raises(SystemExit) as info:
        gpu_script.main([])
    assert "needs CuPy and an NVIDIA GPU" in str(info.value)


def test_refngd_and_peer_code_paths_on_the_cpu(gpu_script):
    torch = pytest.importorskip("torch")
    timer = gpu_script.Timer(1)
    widths, N, lam, record = [12, 16, 16, 5], 6, 1e-3, {}
    model, theta, Xh, yh, d = gpu_script.refngd_figures(np, timer, widths, N, lam, True, record)
    figures = record[f"refngd N={N}"]
    for key in ("ngd", "stage Gram", "stage factor + solve", "gradient", "per-sample gradients",
                "K-FAC build + solve", "K-FAC cached solve"):
        assert figures[key] > 0, key
    gpu_script.peer_figures(torch, timer, widths, Xh, yh, np.asarray(theta), d, lam, 1e-10,
                            record, N, device="cpu")
    notes = record[f"notes N={N}"]
    # the torch.func Gram route is exact: the same direction to round-off
    assert notes["torch.func Gram route rel. diff. to refngd"] < 1e-10, notes
    assert "torch.func per-sample gradients" in record[f"peers N={N}"]
    if "curvlinops" in notes:  # not installed here
        assert notes["curvlinops"].startswith("skipped")
    else:  # CG to a relative residual of 1e-10 on a well-damped small system
        assert notes["curvlinops GGN + CG rel. diff. to refngd"] < 1e-7, notes
        assert record[f"peers N={N}"]["curvlinops K-FAC build + solve"] > 0

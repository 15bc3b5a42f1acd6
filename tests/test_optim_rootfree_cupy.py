"""The root-free, inverse-free and AdamQLR optimizers on CuPy arrays (skipped without a GPU)."""
import numpy as np
import pytest
from devices import gpu_available

from refngd import optim

import handmlp



MAKERS = [lambda: optim.RFRMSProp(lr=0.1, momentum=0.9), lambda: optim.RFAdam(lr=1.0),
          lambda: optim.IKFAC(lr=0.1, update_every=1), lambda: optim.INGD(lr=0.01, update_every=1),
          lambda: optim.SIRFShampoo(lr=0.03), lambda: optim.AdamQLR()]


@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("make", MAKERS)
def test_same_steps_on_cupy(make):
    import cupy

    model, theta, loss, X, y = handmlp.make(N=16)
    opt = make()
    st, th = opt.init(theta), theta
    stc, thc = opt.init(cupy.asarray(theta)), cupy.asarray(theta)
    for _ in range(2):
        th, st, _ = opt.step(th, st, model, loss, X, y)
        thc, stc, info = opt.step(thc, stc, model, loss, cupy.asarray(X), cupy.asarray(y))
    assert isinstance(thc, cupy.ndarray) and isinstance(info["loss"], float)
    np.testing.assert_allclose(cupy.asnumpy(thc), th, rtol=1e-8, atol=1e-10)

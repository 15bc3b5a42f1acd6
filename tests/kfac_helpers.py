"""Helpers shared by the K-FAC test files."""
import numpy as np


def rel_err(a, b):
    """max |a − b| / max |b| (with a floor for an all-zero reference)."""
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


def block_mask(model, bias):
    """K-FAC's block structure: per parameter tensor (separate) or per layer (joint)."""
    M = np.zeros((model.num_params,) * 2, dtype=bool)
    for layer, (s, e) in zip(model.layers, model.slices):
        if bias == "joint":
            M[s:e, s:e] = True
            continue
        for shape in layer.param_shapes:
            n = int(np.prod(shape))
            M[s:s + n, s:s + n] = True
            s += n
    return M


def conv_reference_factors(a, b, c, approx, bias):
    """K-FAC's (A, G) of a convolution from its patches a (N, T, D) and output rows
    b (N, K, C_out, T), written out (Eschenhagen et al. 2023, K-FAC-expand and -reduce): expand
    A = Σ_nt ā ā ᵀ/(N·T), G = c Σ_nkt b bᵀ; reduce A = Σ_n (mean_t ā)(mean_t ā)ᵀ/N,
    G = c Σ_nk (Σ_t b)(Σ_t b)ᵀ.  ``bias="joint"`` appends the ones column to ā."""
    N, T = a.shape[:2]
    if bias == "joint":
        a = np.concatenate([a, np.ones((N, T, 1))], axis=2)
    if approx == "expand":
        return (np.einsum("ntd,nte->de", a, a) / (N * T),
                c * np.einsum("nkot,nkpt->op", b, b))
    return (np.einsum("nd,ne->de", a.mean(1), a.mean(1)) / N,
            c * np.einsum("nko,nkp->op", b.sum(3), b.sum(3)))

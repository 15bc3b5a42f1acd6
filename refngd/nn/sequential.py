"""``Sequential``: a chain of layers on one flat parameter vector θ in PyTorch order."""
from __future__ import annotations

import math

from ..backend import Array, check_float_array, get_backend, namespace
from ..rows import LayerRows, RowSet
from .base import Layer, ParametricLayer


class Sequential:
    """A feed-forward network ``Sequential(*layers)``, as :class:`torch.nn.Sequential`.

    The model is stateless: parameters live in one flat vector θ laid out exactly as
    ``torch.nn.utils.parameters_to_vector(model.parameters())`` — layer by layer, weight
    (PyTorch's shape, row-major) then bias.  The output must be (N, C): end a CNN with
    ``Flatten()`` and a ``Linear``.

    Computation runs in θ's dtype (float64 by default, float32 allowed); X is cast to it.
    """

    def __init__(self, *layers: Layer):
        if not layers:
            raise ValueError("Sequential needs at least one layer.")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} ({layer!r}) is not a refngd.nn layer.")
        self.layers = tuple(layers)
        self.slices, start = [], 0
        for layer in self.layers:
            size = sum(math.prod(s) for s in layer.param_shapes)
            self.slices.append((start, start + size))
            start += size
        self.num_params = start

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"

    # ------------------------------------------------------------------ parameters
    def init(self, rng, dtype="float64", backend: str = "numpy") -> Array:
        """θ drawn with PyTorch's default initialisation, using NumPy Generator ``rng``."""
        xp = get_backend(backend)
        if not hasattr(rng, "uniform"):
            raise TypeError(
                f"rng must be a numpy.random.Generator (numpy.random.default_rng(seed)), "
                f"got {type(rng).__name__}."
            )
        if xp.dtype(dtype) not in (xp.float32, xp.float64):
            raise TypeError(f"dtype must be float64 (default) or float32, got {dtype!r}.")
        parts = [xp.asarray(p, dtype=dtype).reshape(-1) for layer in self.layers
                 for p in layer.init_params(rng)]
        return xp.concatenate(parts) if parts else xp.zeros(0, dtype=dtype)

    def unflatten(self, theta: Array) -> list[list[Array]]:
        """Per layer, the list of its parameter arrays (views of θ, PyTorch shapes)."""
        self._check_theta(theta)
        out = []
        for layer, (start, _) in zip(self.layers, self.slices):
            blocks, i = [], start
            for shape in layer.param_shapes:
                size = math.prod(shape)
                blocks.append(theta[i:i + size].reshape(shape))
                i += size
            out.append(blocks)
        return out

    def flatten(self, params: list[list[Array]]) -> Array:
        """Inverse of :meth:`unflatten`."""
        flat = [p.reshape(-1) for blocks in params for p in blocks]
        if not flat:
            raise ValueError("this model has no parameters.")
        theta = namespace(*flat).concatenate(flat)
        self._check_theta(theta)
        return theta

    def _check_theta(self, theta):
        check_float_array("theta", theta, ndim=1)
        if theta.shape[0] != self.num_params:
            raise ValueError(
                f"theta has {theta.shape[0]} entries but the model has {self.num_params} "
                "parameters; build theta with model.init(rng) or model.flatten(params)."
            )

    # ------------------------------------------------------------------ forward
    def _check_input(self, theta, X):
        check_float_array("X", X)
        if X.ndim < 2 or X.shape[0] < 1:
            raise ValueError(f"X must be a batch of shape (N, ...) with N >= 1, got {tuple(X.shape)}.")
        shape = tuple(X.shape[1:])
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.out_shape(shape)
            except ValueError as err:
                raise ValueError(f"layer {i}: {err}") from None
        if len(shape) != 1:
            raise ValueError(
                f"the model output per sample has shape {shape}; refngd needs (C,): end with Flatten()."
            )
        return X.astype(theta.dtype, copy=False)

    def forward(self, theta: Array, X: Array) -> Array:
        """Model outputs Z = f(X; θ), shape (N, C)."""
        return self.linearize(theta, X).outputs

    def linearize(self, theta: Array, X: Array) -> "Linearization":
        """Run the forward pass once and keep what every later backward pass needs."""
        params = self.unflatten(theta)
        x = self._check_input(theta, X)
        steps = []
        for layer, p, (start, stop) in zip(self.layers, params, self.slices):
            x, cache = layer.forward(p, x)
            steps.append((layer, p, cache, start, stop))
        xp = namespace(x)
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError(
                f"the model outputs contain NaN or Inf (overflow in {x.dtype}); check the "
                "scale of theta and X."
            )
        return Linearization(self, theta, x, steps, X)


class Linearization:
    """A forward pass kept for back-propagating row cotangents (cf. ``jax.vjp``).

    Attributes
    ----------
    outputs : (N, C) model outputs z_n.
    theta, X : the point and batch it was built for (checked when it is reused:
        :func:`refngd.validation.linearization_for`).
    """

    def __init__(self, model, theta, outputs, steps, X=None):
        self.model, self.theta, self.outputs, self._steps = model, theta, outputs, steps
        self.X = X

    def backprop(self, cotangents: Array) -> RowSet:
        """Back-propagate R = N·K output-space rows ``cotangents`` (N, K, C) once.

        Row (n, k) becomes u_nk = J_nᵀ cotangents[n, k]; the returned :class:`RowSet`
        contracts the implicit U (R × P) without forming it.
        """
        N, C = self.outputs.shape
        check_float_array("cotangents", cotangents)
        if cotangents.ndim != 3 or cotangents.shape[0] != N or cotangents.shape[2] != C:
            raise ValueError(
                f"cotangents must have shape (N, K, C) = ({N}, K, {C}), got {tuple(cotangents.shape)}."
            )
        B = cotangents.astype(self.theta.dtype, copy=False)
        first = next((i for i, s in enumerate(self._steps) if isinstance(s[0], ParametricLayer)), None)
        if first is None:
            raise ValueError("this model has no parameters to differentiate.")
        records = []
        for i in range(len(self._steps) - 1, first - 1, -1):
            layer, p, cache, start, stop = self._steps[i]
            if isinstance(layer, ParametricLayer):
                records.append(LayerRows(layer, p, cache, B, start, stop))
            if i > first:  # the input of the first parametric layer needs no cotangent
                B = layer.backward(p, cache, B)
        records.reverse()
        return RowSet(records, N, cotangents.shape[1], self.model.num_params, self.theta.dtype)

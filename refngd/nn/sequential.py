"""``Sequential``: a chain of layers on one flat parameter vector θ in PyTorch order."""
from __future__ import annotations

from ..backend import (Array, as_generator, check_float_array, get_backend, namespace,
                       one_host_read, require)
from ..rows import LayerRows, RowSet
from .base import Layer, ParametricLayer, num_elements
from .layout import ParamLayout
from .subsets import resolve_params, trainable_mask


class Sequential:
    """A feed-forward network ``Sequential(*layers)``, as :class:`torch.nn.Sequential`.

    The model is stateless: parameters live in one flat vector θ laid out exactly as
    ``torch.nn.utils.parameters_to_vector(model.parameters())`` — layer by layer, weight
    (PyTorch's shape, row-major) then bias.  The output must be (N, C): end a CNN with
    ``Flatten()`` and a ``Linear``.

    Computation runs in θ's dtype (float64 by default, float32 allowed); X is cast to it —
    except for a model that starts with an :class:`~refngd.nn.Embedding`, whose X holds
    integer token indices (N, *S) and is passed on as it is.
    """

    def __init__(self, *layers: Layer):
        if not layers:
            raise ValueError("Sequential needs at least one layer.")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} ({layer!r}) is not a refngd.nn layer.")
        self.layers = tuple(layers)
        #: the θ layout: one TensorSlot per parameter tensor (name, shape, start, stop)
        self.layout = ParamLayout(self.layers)
        #: (start, stop) of each layer's slice of θ
        self.slices = list(self.layout.layer_slices)
        self.num_params = self.layout.num_params

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential(\n  {inner}\n)"

    # ------------------------------------------------------------------ parameters
    def init(self, rng, dtype="float64", backend: str = "numpy") -> Array:
        """θ drawn with PyTorch's default initialisation, from ``rng``.

        ``rng``: a NumPy ``Generator`` or an int seed (``init(0)`` is
        ``init(numpy.random.default_rng(0))``), as everywhere in refngd.
        """
        xp = get_backend(backend)
        if not hasattr(rng, "uniform"):
            if isinstance(rng, bool) or not hasattr(rng, "__index__"):
                raise TypeError(
                    f"rng must be a numpy.random.Generator (numpy.random.default_rng(seed)) or "
                    f"an int seed, got {type(rng).__name__}.")
            rng = as_generator(int(rng))
        if xp.dtype(dtype) not in (xp.float32, xp.float64):
            raise TypeError(f"dtype must be float64 (default) or float32, got {dtype!r}.")
        parts = [xp.asarray(p, dtype=dtype).reshape(-1) for layer in self.layers
                 for p in layer.init_params(rng)]
        return xp.concatenate(parts) if parts else xp.zeros(0, dtype=dtype)

    def unflatten(self, theta: Array) -> list[list[Array]]:
        """Per layer, the list of its parameter arrays (views of θ, PyTorch shapes)."""
        self._check_theta(theta)
        return self.layout.split(theta)

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

    def trainable_mask(self):
        """The default parameter selection (host boolean (P,)): every tensor whose layer's
        ``trainable`` flag is set — all of θ unless a layer freezes some (docs/subsets.md)."""
        return trainable_mask(self)

    # ------------------------------------------------------------------ forward
    def _check_input(self, theta, X):
        for i, layer in enumerate(self.layers[1:], 1):
            if layer.integer_input:
                raise ValueError(f"layer {i}: {layer!r} reads integer indices and must be the "
                                 "first layer of the Sequential.")
        if self.layers[0].integer_input:
            xp = namespace(X)
            if getattr(X, "dtype", None) is None or X.dtype.kind not in "iu":
                raise TypeError(f"X must hold integer indices for {self.layers[0]!r}, got "
                                f"{getattr(X, 'dtype', type(X).__name__)}; use X.astype(int).")
            V = self.layers[0].num_embeddings
            if X.size:  # queued like the label checks (out-of-range indices only index until read)
                require(xp.all((X >= 0) & (X < V)), lambda: ValueError(
                    f"indices in X must lie in [0, {V}) for {self.layers[0]!r}, got "
                    f"[{int(xp.min(X))}, {int(xp.max(X))}]."), X)
        else:
            check_float_array("X", X)
        # integer indices may be one per sample, (N,), as torch.nn.Embedding takes them
        min_ndim = 1 if self.layers[0].integer_input else 2
        if X.ndim < min_ndim or X.shape[0] < 1:
            shape = "(N, ...)" if min_ndim == 2 else "(N,) or (N, ...)"
            raise ValueError(f"X must be a batch of shape {shape} with N >= 1, got "
                             f"{tuple(X.shape)}.")
        shape = tuple(X.shape[1:])
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.out_shape(shape)
            except ValueError as err:
                raise ValueError(f"layer {i}: {err}") from None
        if len(shape) != 1:
            raise ValueError(
                f"the model output per sample has shape {shape}; refngd needs (C,): end with "
                "Flatten(). For a loss per token or position use refngd.losses.PerToken: "
                "outputs (T, C) → PerToken(loss, T); PyTorch's class axis at dimension 1, "
                "(C, d1, ...) → PerToken(CrossEntropy(), d1·..., class_dim=1).")
        return X if self.layers[0].integer_input else X.astype(theta.dtype, copy=False)

    def forward(self, theta: Array, X: Array) -> Array:
        """Model outputs Z = f(X; θ), shape (N, C)."""
        return self.linearize(theta, X).outputs

    @one_host_read
    def linearize(self, theta: Array, X: Array) -> "Linearization":
        """Run the forward pass once and keep what every later backward pass needs."""
        params = self.unflatten(theta)
        x = self._check_input(theta, X)
        steps = []
        for layer, p, (start, stop) in zip(self.layers, params, self.slices):
            x, cache = layer.forward(p, x)
            steps.append((layer, p, cache, start, stop))
        xp = namespace(x)
        require(xp.all(xp.isfinite(x)), ValueError(
            f"the model outputs contain NaN or Inf (overflow in {x.dtype}); check the "
            "scale of theta and X."), x)
        return Linearization(self, theta, x, steps, X)


class Linearization:
    """A forward pass kept for back-propagating row cotangents (cf. ``jax.vjp``).

    Attributes
    ----------
    outputs : (N, C) model outputs z_n.
    theta, X : the point and batch it was built for (checked when it is reused:
        :func:`refngd.nn.protocols.linearization_for`).
    """

    def __init__(self, model, theta, outputs, steps, X=None):
        self.model, self.theta, self.outputs, self._steps = model, theta, outputs, steps
        self.X = X

    def backprop(self, cotangents: Array, params=None) -> RowSet:
        """Back-propagate R = N·K output-space rows ``cotangents`` (N, K, C) once.

        Row (n, k) becomes u_nk = J_nᵀ cotangents[n, k]; the returned :class:`RowSet`
        contracts the implicit U (R × P) without forming it.

        ``params``: ``None`` (here: all of θ) or any selection that
        :func:`refngd.subsets.resolve_params` accepts; the rows are then those of θ[S]
        only (U[:, S], P = |S|).  Frozen tensors get no row record (no Gram, U v or Uᵀ w
        work), and the pass stops at the first layer holding a selected tensor: earlier
        layers need no cotangent.  Layers in between are back-propagated through.
        """
        N, C = self.outputs.shape
        check_float_array("cotangents", cotangents)
        if cotangents.ndim != 3 or cotangents.shape[0] != N or cotangents.shape[2] != C:
            raise ValueError(
                f"cotangents must have shape (N, K, C) = ({N}, K, {C}), got {tuple(cotangents.shape)}."
            )
        subset = None if params is None else resolve_params(self.model, params)
        B = cotangents.astype(self.theta.dtype, copy=False)

        def selected(i):
            layer = self._steps[i][0]
            if not isinstance(layer, ParametricLayer):
                return None
            return subset.active[i] if subset is not None else (True,) * len(layer.param_shapes)

        first = next((i for i in range(len(self._steps)) if any(selected(i) or ())), None)
        if first is None:
            raise ValueError("this model has no parameters to differentiate.")
        records = []
        for i in range(len(self._steps) - 1, first - 1, -1):
            layer, p, cache, start, stop = self._steps[i]
            active = selected(i)
            # one step: the selected tensors' row views (a Composite's from one pass through
            # its sub-layers) and the rows at the layer's input — not needed below the first
            # selected layer
            views, B_in = layer.backward_views(p, cache, B, active or (), need_input=i > first)
            if views:
                pos = start if subset is None else subset.starts[i]
                tensors = [t for t, on in enumerate(active) if on]  # selected tensors, θ order
                recs, j = [], 0
                for prim, c, b in views:  # θ order
                    size = num_elements(prim.param_shapes)
                    # ``part``: the layer's index of the view's first tensor (stable whatever
                    # else is selected, so K-FAC can key per-view input factors by it)
                    recs.append(LayerRows(prim, p, c, b, pos, pos + size, i, tensors[j]))
                    pos += size
                    j += len(prim.param_shapes)
                records.extend(reversed(recs))
            B = B_in
        records.reverse()
        P = self.model.num_params if subset is None else subset.num_params
        return RowSet(records, N, cotangents.shape[1], P, self.theta.dtype, subset)

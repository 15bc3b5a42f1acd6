"""Data sets for ``refngd compare``: scikit-learn's digits, or the user's own ``.npz``.

Host-side loading and preprocessing (NumPy).  Every loader returns a :class:`Dataset`
with a train/test split, features standardised with the *training* mean and standard
deviation, and labels 0..C−1.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A data file or array that refngd cannot use; the message says why and what to do."""


@dataclass
class Dataset:
    """Train/test arrays (float64 features, int64 labels 0..C−1) and a description."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    classes: list = field(default_factory=list)  #: original label of class k

    @property
    def input_shape(self) -> tuple:
        return tuple(self.X_train.shape[1:])

    def describe(self) -> dict:
        return {"name": self.name, "n_train": int(self.X_train.shape[0]),
                "n_test": int(self.X_test.shape[0]), "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "classes": [_py(c) for c in self.classes]}

    def for_model(self, kind: str) -> "Dataset":
        """Inputs shaped for ``kind``: (N, D) for ``"mlp"``, (N, C, H, W) for ``"cnn"``."""
        reshape = flatten if kind == "mlp" else as_images
        return Dataset(self.name, reshape(self.X_train), self.y_train, reshape(self.X_test),
                       self.y_test, self.num_classes, self.classes)


def _py(v):
    return v.item() if hasattr(v, "item") else v


# --------------------------------------------------------------------------- loaders
def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes), split and standardised.

    The image shape is kept as 64 features in row-major order; :meth:`Dataset.for_model`
    with ``"cnn"`` reshapes them to (N, 1, 8, 8).
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError("the digits data set needs scikit-learn: pip install 'refngd[cli]'.") from None
    bunch = _load()
    X = bunch.data.astype(np.float64).reshape(-1, 1, 8, 8)
    return split_and_standardize("digits", X, bunch.target, test_fraction, seed)


def load_npz(path: str, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The user's data: a ``.npz`` with arrays ``X`` (N, ...) and ``y`` (N,) integer labels.

    Optional ``X_test`` and ``y_test`` give a fixed test set; otherwise a seeded random
    ``test_fraction`` of the samples is held out.  Raises :class:`DataError` with the
    reason for anything refngd cannot use.
    """
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist.")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception:  # numpy raises several types (and suggests unsafe loading) for a non-npz file
        raise DataError(f"{path!r} is not a NumPy .npz archive (or it is corrupt); "
                        f"save your data with {_SAVE}.") from None
    if not hasattr(archive, "files"):
        raise DataError(f"{path!r} holds a single array, not an .npz archive; "
                        "save your data with numpy.savez(path, X=X, y=y).")
    with archive:
        keys = set(archive.files)
        missing = {"X", "y"} - keys
        if missing:
            raise DataError(f"{path!r} has no array(s) {sorted(missing)} (it has {sorted(keys)}); "
                            "save your data with numpy.savez(path, X=X, y=y).")
        if ("X_test" in keys) != ("y_test" in keys):
            raise DataError(f"{path!r} must have both X_test and y_test, or neither.")
        X, y = check_arrays(_read(archive, "X", path), _read(archive, "y", path), "X", "y")
        name = os.path.basename(path)
        if "X_test" in keys:
            Xt, yt = check_arrays(_read(archive, "X_test", path), _read(archive, "y_test", path),
                                  "X_test", "y_test")
            if Xt.shape[1:] != X.shape[1:]:
                raise DataError(f"X_test has per-sample shape {Xt.shape[1:]} but X has {X.shape[1:]}.")
            return _finish(name, X, y, Xt, yt)
    return split_and_standardize(name, X, y, test_fraction, seed)


_SAVE = "numpy.savez(path, X=X, y=y) from plain numeric arrays"


def _read(archive, key: str, path: str):
    """One array of the archive; pickled (object) arrays are refused, never unpickled."""
    try:
        return archive[key]
    except ValueError as err:
        if "allow_pickle" not in str(err) and "pickle" not in str(err):
            raise DataError(f"could not read array {key!r} of {path!r}; save your data with {_SAVE}.") from None
        raise DataError(f"array {key!r} of {path!r} holds pickled Python objects; refngd never "
                        "unpickles data (loading a pickle can run arbitrary code). Convert it to a "
                        f"numeric array and save it with {_SAVE}.") from None
    except Exception:  # a damaged member of the zip archive
        raise DataError(f"array {key!r} of {path!r} is corrupt; save your data again with {_SAVE}.") from None


def check_arrays(X, y, xname: str = "X", yname: str = "y"):
    """Validate features and integer labels; return float64 X and int64 y."""
    X, y = np.asarray(X), np.asarray(y)
    if X.dtype == object or y.dtype == object:
        raise DataError(f"{xname} and {yname} must be numeric arrays, not object arrays.")
    if X.dtype.kind not in "biuf":
        raise DataError(f"{xname} must hold numbers, got dtype {X.dtype}.")
    if X.ndim < 2:
        raise DataError(f"{xname} must have shape (N, features...) with one row per sample, "
                        f"got shape {X.shape}.")
    if y.ndim != 1:
        hint = " Use y.ravel() or the arg-max of one-hot labels." if y.ndim == 2 else ""
        raise DataError(f"{yname} must be 1-dimensional class labels of shape (N,), got {y.shape}.{hint}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{yname} must hold integer class labels, got dtype {y.dtype}; "
                        f"convert with {yname}.astype(int) if they are whole numbers.")
    if X.shape[0] != y.shape[0]:
        raise DataError(f"{xname} has {X.shape[0]} samples but {yname} has {y.shape[0]}.")
    if X.shape[0] < 2:
        raise DataError(f"{xname} needs at least 2 samples, got {X.shape[0]}.")
    if math.prod(X.shape[1:]) == 0:
        raise DataError(f"{xname} has no features (shape {X.shape}).")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise DataError(f"{xname} contains NaN or Inf values; remove or impute them first.")
    return X, y.astype(np.int64)


def split_and_standardize(name: str, X, y, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Seeded random split (``test_fraction`` held out), then :func:`_finish`."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
    N = X.shape[0]
    n_test = min(N - 1, max(1, int(round(test_fraction * N))))
    perm = np.random.default_rng(seed).permutation(N)
    test, train = perm[:n_test], perm[n_test:]
    return _finish(name, X[train], y[train], X[test], y[test])


def _finish(name, X, y, Xt, yt) -> Dataset:
    classes = np.unique(y)
    if classes.size < 2:
        raise DataError(f"the training labels have a single class ({classes.tolist()}); "
                        "classification needs at least 2.")
    unknown = np.setdiff1d(np.unique(yt), classes)
    if unknown.size:
        raise DataError(f"the test labels {unknown.tolist()} do not occur in the training labels.")
    # Standardise in a scaled form: dividing each feature by its largest |training value|
    # first leaves (x − mean)/std unchanged mathematically, but keeps the mean and the
    # squares of the standard deviation finite for data of any magnitude (1e200, 1e308).
    scale = np.abs(X).max(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Xs, Xts = X / scale, Xt / scale
    mean = Xs.mean(axis=0)
    std = Xs.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # constant features (e.g. digits' border pixels) stay 0
    X_std, Xt_std = (Xs - mean) / std, (Xts - mean) / std
    if not (np.all(np.isfinite(X_std)) and np.all(np.isfinite(Xt_std))):
        raise DataError("the features overflow float64 when standardised: the test features are "
                        "far outside the training range (by a factor near 1e308); check the data.")
    return Dataset(name, X_std, np.searchsorted(classes, y), Xt_std,
                   np.searchsorted(classes, yt), int(classes.size), classes.tolist())


# ------------------------------------------------------------------------ reshaping
def flatten(X: np.ndarray) -> np.ndarray:
    """(N, ...) → (N, D) in row-major order."""
    return X.reshape(X.shape[0], -1)


def as_images(X: np.ndarray) -> np.ndarray:
    """Inputs as NCHW images for a CNN.

    (N, C, H, W) is kept; (N, H, W) gets one channel; (N, D) with a perfect-square D is
    read as one-channel √D × √D images (row-major).  Anything else is an error.
    """
    if X.ndim == 4:
        return X
    if X.ndim == 3:
        return X[:, None]
    if X.ndim == 2:
        s = math.isqrt(X.shape[1])
        if s * s == X.shape[1]:
            return X.reshape(X.shape[0], 1, s, s)
    raise DataError(
        f"--model cnn needs image inputs: X of shape (N, C, H, W), (N, H, W) or (N, D) with "
        f"D a perfect square; got per-sample shape {X.shape[1:]}. Use --model mlp instead."
    )

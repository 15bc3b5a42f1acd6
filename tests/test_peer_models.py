"""The peers' own test models, imported with one ``from_torch(model, X)`` call (issue 20).

Architectures of the model zoos in curvlinops' and BackPACK's test suites, written anew
here (no code copied; the source of each is named in its docstring):

* curvlinops, commit 63fd690de70ce4f59a3361e6e3d89c71035845db (main; the installed
  release 3.0.1 is ba9c0bba59ff3f2e854c109a16aa222818b2d277): ``test/cases.py``,
  ``test/kfac_cases.py``, ``test/utils.py`` (``WeightShareModel``, ``Conv2dModel``,
  ``UnetModel``, ``SplitConcatModel``, ``WeightTiedSplitConcatModel``,
  ``ModelWithDictInput``), ``test/test_kfac.py``.
* BackPACK, commit 366bcd603cb48e561155919537565e03f4574825: ``test/converter/
  converter_cases.py``, ``test/converter/resnet_cases.py``, the branched models of
  ``test/extensions/secondorder/diag_ggn/diag_ggn_settings.py`` and the ``Pad`` /
  ``Slicing`` models of ``test/extensions/secondorder/secondorder_settings.py``.

Each model is imported in float64 with ``interop.from_torch(model, X)``; its forward must
equal PyTorch's to 1e-12, its GGN (dense, or GGN-vector products for the larger ones)
curvlinops' ``GGNLinearOperator`` to 1e-10 and, where curvlinops 3.0.1 computes K-FAC
(Linear and Conv2d layers, no tied weights), refngd's K-FAC with
``convention="curvlinops"`` its ``KFACLinearOperator`` (type-2, expand / reduce) to 1e-10,
and EKFAC its ``EKFACLinearOperator`` where that takes the model's (N, C) outputs (reduce
only where A_reduce has simple eigenvalues: with a rank-deficient one the eigenvalues in
its null space depend on an arbitrary basis, tests/test_curvlinops_sequences.py).
Elementwise losses on (N, ..., C) outputs are ``PerToken`` losses here: ``from_torch_loss``
gives the loss of the flattened outputs, whose GGN is the same but whose K-FAC in
curvlinops' convention is not.  Models refngd refuses are checked to be refused with the
node's name, op and source line.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
curvlinops = pytest.importorskip("curvlinops")
tnn = torch.nn
F = torch.nn.functional

from refngd import interop  # noqa: E402
from refngd.curvature import EKFAC, KFAC, Fisher  # noqa: E402
from refngd.losses import PerToken  # noqa: E402

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: torch's thread pool only spins on a loaded machine (a test took 7 s
    with it, 0.1 s without)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# --------------------------------------------------------------------------- harness
def _targets(lname, out_shape, C_axis=1, rng=None):
    """Targets for torch's loss on outputs of shape ``out_shape`` (batch first)."""
    rng = rng or np.random.default_rng(0)
    if lname == "CrossEntropyLoss":
        shape = out_shape[:C_axis] + out_shape[C_axis + 1:]
        return torch.tensor(rng.integers(0, out_shape[C_axis], shape))
    if lname == "BCEWithLogitsLoss":  # curvlinops 3.0.1 takes binary targets only
        return torch.tensor(rng.integers(0, 2, out_shape).astype(np.float64))
    return torch.tensor(rng.standard_normal(out_shape))


def assert_agree(net, X, lname="MSELoss", red="mean", kfac=(), vectors=None, ekfac=()):
    """Import ``net`` with X, compare forward, GGN, K-FAC and EKFAC with PyTorch /
    curvlinops.  Returns the errors {forward (max abs), ggn, kfac-*, ekfac-* (relative)}.
    """
    net = net.double().eval()
    X = X.to(DT) if X.is_floating_point() else X
    model, theta = interop.from_torch(net, X)
    out = net(X).detach()
    errs = {"forward": float(np.max(np.abs(model.forward(theta, X.numpy()).reshape(out.shape)
                                           - out.numpy())))}
    assert errs["forward"] <= 1e-12, errs
    y = _targets(lname, tuple(out.shape))
    lm = getattr(tnn, lname)(reduction=red)
    loss, yy = interop.from_torch_loss(lm, tuple(out.shape[1:])), y.numpy()
    if lname != "CrossEntropyLoss" and out.dim() > 2:
        # (N, ..., C) outputs of an elementwise loss: from_torch_loss gives the loss on the
        # flattened outputs, whose GGN is the same but whose K-FAC in curvlinops'
        # convention is not (curvlinops counts the shared axes as loss terms)
        T = int(np.prod(out.shape[1:-1]))
        loss, yy = PerToken(loss, T), yy.reshape(len(yy), T, -1)
    params = [p for p in net.parameters() if p.requires_grad]
    data = [(X, y)]
    ggn = curvlinops.GGNLinearOperator(net, lm, params, data, check_deterministic=False)
    assert abs(loss(model.forward(theta, X.numpy()), yy) - float(lm(out, y))) <= 1e-12 * (
        1 + abs(float(lm(out, y))))
    ours = Fisher(model, theta, loss, X.numpy(), yy)
    P = theta.size
    if vectors is None:
        theirs = (ggn @ torch.eye(P, dtype=DT)).numpy()
        errs["ggn"] = rel(ours.dense(), theirs)
    else:
        V = np.random.default_rng(5).standard_normal((P, vectors))
        theirs = (ggn @ torch.tensor(V)).numpy()
        errs["ggn"] = max(rel(ours.matvec(V[:, j]), theirs[:, j]) for j in range(vectors))
    assert np.linalg.norm(theirs) > 0, "a zero GGN (dead ReLUs?) would compare nothing"
    assert errs["ggn"] <= 1e-10, errs
    # EKFAC reduce: only where A_reduce has simple eigenvalues (docs/kfac.md)
    pairs = [("kfac", curvlinops.KFACLinearOperator, KFAC, a) for a in kfac] + \
        [("ekfac", curvlinops.EKFACLinearOperator, EKFAC, a) for a in ekfac]
    for name, theirs_cls, mine_cls, approx in pairs:
        op = theirs_cls(net, lm, params, data, fisher_type="type-2", kfac_approx=approx,
                        check_deterministic=False)
        mine = mine_cls(model, theta, loss, X.numpy(), yy, kfac_approx=approx,
                        convention="curvlinops").dense()
        errs[f"{name}-{approx}"] = rel(mine, (op @ torch.eye(P, dtype=DT)).numpy())
        assert errs[f"{name}-{approx}"] <= 1e-10, errs
    return errs


def assert_refused(net, X, *words):
    """``from_torch(net, X)`` refuses, naming ``words`` (the node, op, source line)."""
    with pytest.raises(interop.UnsupportedModuleError) as info:
        interop.from_torch(net.double().eval(), X.to(DT) if X.is_floating_point() else X)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    return msg


# --------------------------------------------------------------------- curvlinops' models
def mlp(d_in=10, h=5, c=3):
    """test/cases.py: ``Linear(10, 5), ReLU, Linear(5, 3)`` (and 8-5-3, 10-5-2, 10-5-1)."""
    return tnn.Sequential(tnn.Linear(d_in, h), tnn.ReLU(), tnn.Linear(h, c))


class DictInput(tnn.Module):
    """test/cases.py ``ModelWithDictInput``: forward reads ``data["x"]`` of a mapping."""

    def __init__(self, c=3):
        super().__init__()
        self.net = mlp(10, 5, c)

    def forward(self, data):
        return self.net(data["x"])


class WeightShare(tnn.Sequential):
    """test/utils.py ``WeightShareModel``: a Sequential on (N, ..., d) whose outputs
    (N, ..., c) are kept ("expand"; classes moved to axis 1 for CrossEntropyLoss),
    flattened ("expand-flatten") or averaged over the shared axes ("reduce").  Written with
    ``movedim`` / ``flatten`` / ``mean`` where curvlinops uses ``vmap`` and einops."""

    def __init__(self, *layers, setting="expand", class_first=False):
        super().__init__(*layers)
        self.setting, self.class_first = setting, class_first

    def forward(self, x):
        z = super().forward(x)
        if self.setting == "reduce":
            return z.mean(dim=tuple(range(1, z.dim() - 1)))
        if self.setting == "expand-flatten":
            return z.flatten(1)
        return z.movedim(-1, 1) if self.class_first else z


class WeightShareVmap(tnn.Sequential):
    """``WeightShareModel`` as curvlinops writes it: ``torch.vmap`` over the batch of an
    einops ``reduce`` / ``rearrange`` per datum."""

    def __init__(self, *layers, setting="reduce"):
        super().__init__(*layers)
        self.setting = setting

    def forward(self, x):
        import einops
        z = super().forward(x)
        if self.setting == "reduce":
            return torch.vmap(lambda zn: einops.reduce(zn, "... c -> c", "mean"))(z)
        return torch.vmap(lambda zn: einops.rearrange(zn, "... c -> (... c)"))(z)


class Conv2dSetting(tnn.Module):
    """test/utils.py ``Conv2dModel``: ``Conv2d(3, 2, 4, padding=2)`` then (N, H, W, C)
    ("expand", einops ``Rearrange("batch c h w -> batch h w c")``), flattened
    ("expand-flatten") or ``AdaptiveAvgPool2d(1), Flatten()`` ("reduce")."""

    def __init__(self, setting, einops_layer=False):
        super().__init__()
        self.conv, self.setting = tnn.Conv2d(3, 2, 4, padding=2), setting
        self.pool = tnn.AdaptiveAvgPool2d(1)
        self.rearrange = None
        if einops_layer:
            from einops.layers.torch import Rearrange
            self.rearrange = Rearrange("batch c h w -> batch h w c")

    def forward(self, x):
        z = self.conv(x)
        if self.setting == "reduce":
            return torch.flatten(self.pool(z), start_dim=1)
        if self.rearrange is not None:
            return self.rearrange(z)
        z = z.permute(0, 2, 3, 1)
        return z.flatten(1) if self.setting == "expand-flatten" else z


class Unet(tnn.Module):
    """test/utils.py ``UnetModel``: strided Conv2d, Conv2d, nearest ``Upsample(2)``, Conv2d;
    outputs (N, H, W, 3) for MSE / BCE, (N, 3, H, W) (``Identity``) for cross-entropy."""

    def __init__(self, class_first=False):
        super().__init__()
        self.body = tnn.Sequential(tnn.Conv2d(3, 2, 3, padding=1, stride=2),
                                   tnn.Conv2d(2, 2, 3, padding=1),
                                   tnn.Upsample(scale_factor=2, mode="nearest"),
                                   tnn.Conv2d(2, 3, 3, padding=1),
                                   tnn.Identity())
        self.class_first = class_first

    def forward(self, x):
        z = self.body(x)
        return z if self.class_first else z.permute(0, 2, 3, 1)


class SplitShared(tnn.Module):
    """test/utils.py ``SplitConcatModel``: one Linear(D, D) on both halves of the input."""

    def __init__(self, D=4, bias=False):
        super().__init__()
        self.linear, self.D = tnn.Linear(D, D, bias=bias), D

    def forward(self, x):
        a, b = x.split(self.D, dim=-1)
        return torch.cat([self.linear(a), self.linear(b)], dim=-1)


class SplitTied(tnn.Module):
    """test/utils.py ``WeightTiedSplitConcatModel``: two Linear modules, one weight."""

    def __init__(self, D=4, bias1=True, bias2=False):
        super().__init__()
        self.linear1, self.linear2 = tnn.Linear(D, D, bias=bias1), tnn.Linear(D, D, bias=bias2)
        self.linear2.weight, self.D = self.linear1.weight, D

    def forward(self, x):
        a, b = x.split(self.D, dim=-1)
        return torch.cat([self.linear1(a), self.linear2(b)], dim=-1)


def cnn():
    """test/cases.py ``CNN_CASES``: two Conv2d-ReLU-MaxPool2d blocks, Flatten, Linear."""
    return tnn.Sequential(tnn.Conv2d(1, 3, 5), tnn.ReLU(), tnn.MaxPool2d(2),
                          tnn.Conv2d(3, 6, 5), tnn.ReLU(), tnn.MaxPool2d(2),
                          tnn.Flatten(), tnn.Linear(6 * 4, 10))


def dropout_mlp():
    """test/cases.py non-deterministic case: Linear, Dropout, ReLU, Linear (eval())."""
    return tnn.Sequential(tnn.Linear(10, 5), tnn.Dropout(), tnn.ReLU(), tnn.Linear(5, 2))


def batchnorm_mlp():
    """test/cases.py non-deterministic case: Linear, BatchNorm1d, ReLU, Linear (eval())."""
    bn = tnn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.uniform_(), bn.bias.uniform_()
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
    return tnn.Sequential(tnn.Linear(10, 5), bn, tnn.ReLU(), tnn.Linear(5, 2))


class FunctionalMLP(tnn.Module):
    """test/cases.py ``_make_callable_case``: ``relu(linear(X, W1, b1))``, ``linear(., W2,
    b2)`` with the parameters passed to ``F.linear`` directly."""

    def __init__(self):
        super().__init__()
        self.W1, self.b1 = tnn.Parameter(torch.rand(5, 10)), tnn.Parameter(torch.rand(5))
        self.W2, self.b2 = tnn.Parameter(torch.rand(3, 5)), tnn.Parameter(torch.rand(3))

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.W1, self.b1)), self.W2, self.b2)


def flatten_batch():
    """test/test_kfac.py: ``Linear, Linear, Flatten(start_dim=0, end_dim=-2)`` — the batch
    and the shared axes merged into one."""
    return tnn.Sequential(tnn.Linear(5, 4), tnn.Linear(4, 3), tnn.Flatten(0, -2))


# ----------------------------------------------------------------------- BackPACK's models
class InplaceActivation(tnn.Module):
    """converter_cases.py ``_InplaceActivation``: Linear, ``ReLU(inplace=True)``, Linear."""

    def __init__(self):
        super().__init__()
        self.linear, self.relu, self.linear2 = (tnn.Linear(3, 2), tnn.ReLU(inplace=True),
                                                tnn.Linear(2, 2))

    def forward(self, x):
        return self.linear2(self.relu(self.linear(x)))


class MultipleUsages(tnn.Module):
    """converter_cases.py ``_MultipleUsages``: one ReLU module called three times."""

    def __init__(self):
        super().__init__()
        self.linear, self.relu, self.linear2 = tnn.Linear(3, 2), tnn.ReLU(), tnn.Linear(2, 2)

    def forward(self, x):
        return self.relu(self.linear2(self.relu(self.linear(self.relu(x)))))


class FlattenNetwork(tnn.Module):
    """converter_cases.py ``_FlattenNetwork``: ``torch.flatten(x, 2)`` and ``x.flatten(1)``."""

    def __init__(self):
        super().__init__()
        self.linear, self.linear2 = tnn.Linear(4, 3), tnn.Linear(2 * 3, 3)

    def forward(self, x):
        return self.linear2(torch.flatten(self.linear(x), 2)).flatten(1)


class Multiply(tnn.Module):
    """converter_cases.py ``_Multiply``: ``x * 2.5``, ``0.5 * x``, ``x.multiply(3.1415)``."""

    def __init__(self):
        super().__init__()
        self.linear = tnn.Linear(4, 3)

    def forward(self, x):
        return (0.5 * self.linear(x * 2.5)).multiply(3.1415)


class Add(tnn.Module):
    """converter_cases.py ``_Add``: ``x1 + x2`` and ``x.add(x2)``."""

    def __init__(self):
        super().__init__()
        self.linear, self.linear1, self.linear2 = (tnn.Linear(3, 3), tnn.Linear(3, 2),
                                                   tnn.Linear(3, 2))

    def forward(self, x):
        x = self.linear(x)
        x2 = self.linear2(x)
        return torch.relu(self.linear1(x) + x2).add(x2)


class PermuteNet(tnn.Module):
    """converter_cases.py ``_Permute`` / ``_Transpose``: Linear over the last axis, swap the
    last two, Linear, swap back; (N, C, T) outputs for CrossEntropyLoss."""

    def __init__(self, transpose=False):
        super().__init__()
        out2 = 3 if transpose else 2
        self.linear, self.linear2, self.transpose = tnn.Linear(3, 2), tnn.Linear(5, out2), transpose

    def forward(self, x):
        x = self.linear(x)
        x = x.transpose(1, 2) if self.transpose else x.permute(0, 2, 1)
        x = self.linear2(x)
        return torch.transpose(x, 1, 2) if self.transpose else torch.permute(x, (0, 2, 1))


class CharRNN(tnn.Module):
    """converter_cases.py ``_TolstoiCharRNN`` / ``_TolstoiRNNVersion`` (tiny): Embedding,
    LSTM or RNN, Linear, (N, V, T)."""

    def __init__(self, V=5, H=4, cell=tnn.LSTM):
        super().__init__()
        self.embedding, self.lstm = tnn.Embedding(V, H), cell(H, H, batch_first=True)
        self.dense = tnn.Linear(H, V)

    def forward(self, x):
        x, _ = self.lstm(self.embedding(x))
        return self.dense(x).permute(0, 2, 1)


class EulerStep(tnn.Module):
    """resnet_cases.py ``ResNet1``: ``x + 0.1 · MLP(x)``."""

    def __init__(self, d=2, h=10):
        super().__init__()
        self.net = tnn.Sequential(tnn.Linear(d, h), tnn.Tanh(), tnn.Linear(h, h), tnn.Tanh(),
                                  tnn.Linear(h, d))

    def forward(self, x):
        return x + self.net(x) * 0.1


class Block(tnn.Module):
    """torchvision's ``BasicBlock`` (as resnet_cases.py ``ResNet2`` uses it): two 3×3
    Conv2d-BatchNorm2d, in-place ReLU, a 1×1 strided Conv2d-BatchNorm2d shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu = tnn.BatchNorm2d(cout), tnn.ReLU(inplace=True)
        self.conv2, self.bn2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                             tnn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SmallResNet(tnn.Module):
    """resnet_cases.py ``ResNet2``: ResNet-18's stem (7×7 stride-2 Conv2d, BatchNorm2d,
    ReLU, 3×3 stride-2 MaxPool2d), three stages of two blocks (2, 4, 8 channels),
    ``AdaptiveAvgPool2d((1, 1))``, ``flatten``, Linear(8, 3); input (N, 3, 7, 7)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(3, 2, 7, 2, 3, bias=False), tnn.BatchNorm2d(2)
        self.relu, self.maxpool = tnn.ReLU(inplace=True), tnn.MaxPool2d(3, 2, 1)
        self.layer1 = tnn.Sequential(Block(2, 2, 1), Block(2, 2, 1))
        self.layer2 = tnn.Sequential(Block(2, 4, 2), Block(4, 4, 1))
        self.layer3 = tnn.Sequential(Block(4, 8, 2), Block(8, 8, 1))
        self.avgpool, self.fc = tnn.AdaptiveAvgPool2d((1, 1)), tnn.Linear(8, 3)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, tnn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Skip(tnn.Module):
    """BackPACK's ``Parallel(Identity(), branch)`` (a sum of the branches): ``x + branch(x)``."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


def branching_linear():
    """diag_ggn_settings.py "branching-linear"."""
    return tnn.Sequential(tnn.Linear(10, 5), tnn.ReLU(), Skip(tnn.Linear(5, 5)), tnn.Sigmoid(),
                          tnn.Linear(5, 4))


def branching_conv(nested=False):
    """diag_ggn_settings.py "branching-convolution" / "nested-branching-convolution"."""
    if not nested:
        return tnn.Sequential(
            tnn.Conv2d(2, 3, 3, padding=1), tnn.ReLU(),
            Skip(tnn.Sequential(tnn.Conv2d(3, 5, 3, padding=1), tnn.ReLU(),
                                tnn.Conv2d(5, 3, 3, padding=1))),
            tnn.MaxPool2d(3, stride=2), tnn.Flatten(), tnn.Linear(12, 5))
    inner = Skip(tnn.Sequential(tnn.Conv2d(2, 4, 3, padding=1), tnn.ReLU(),
                                tnn.Conv2d(4, 2, 3, padding=1)))
    return tnn.Sequential(
        tnn.Conv2d(3, 2, 3, padding=1), tnn.ReLU(),
        Skip(tnn.Sequential(tnn.Conv2d(2, 4, 3, padding=1), tnn.Sigmoid(),
                            tnn.Conv2d(4, 2, 3, padding=1), inner)),
        tnn.MaxPool2d(3, stride=2), tnn.Flatten(), tnn.Linear(8, 5))


class Pad(tnn.Module):
    """BackPACK's ``Pad(pad, mode="constant", value)``: ``F.pad``."""

    def __init__(self, pad, value):
        super().__init__()
        self.pad, self.value = pad, value

    def forward(self, x):
        return F.pad(x, self.pad, mode="constant", value=self.value)


def padded_cnn(second=False):
    """secondorder_settings.py, "Custom Pad mod" (the second pads the channels too)."""
    if not second:
        return tnn.Sequential(tnn.Conv2d(3, 2, 2), Pad((1, 1, 0, 2), 0.0),
                              tnn.Conv2d(2, 2, 3, stride=2), tnn.Flatten(), tnn.Linear(8, 2))
    return tnn.Sequential(tnn.Conv2d(3, 2, 3, padding=1), tnn.ReLU(),
                          Pad((1, 1, 2, 0, 1, 2), 1.0), tnn.Conv2d(5, 2, 3, stride=2),
                          tnn.ReLU(), tnn.Flatten(), tnn.Linear(8, 3))


class Slice(tnn.Module):
    """BackPACK's ``Slicing(index)``: ``x[index]``."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, x):
        return x[self.index]


def sliced_cnn(second=False):
    """secondorder_settings.py, "Custom Slicing mod"."""
    S = slice(None)
    if not second:
        return tnn.Sequential(tnn.Conv2d(3, 2, 2, padding=1),
                              Slice((S, 0, slice(None, None, 2), slice(0, 2))), tnn.ReLU(),
                              tnn.Flatten(), tnn.Linear(6, 4))
    return tnn.Sequential(tnn.Conv2d(3, 2, 2, padding=1), Slice((S, S, 2)), tnn.ReLU(),
                          Slice((S, 1)), tnn.Linear(6, 4))


def R(*shape):
    return torch.rand(*shape, dtype=DT)


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("lname,red,c", [("CrossEntropyLoss", "mean", 3),
                                         ("CrossEntropyLoss", "sum", 3),
                                         ("BCEWithLogitsLoss", "mean", 2),
                                         ("MSELoss", "sum", 3)])
def test_curvlinops_mlp(lname, red, c):
    """test/cases.py: the MLP of the classification and regression cases."""
    torch.manual_seed(0)
    assert_agree(mlp(10, 5, c), R(3, 10), lname, red, kfac=("expand", "reduce"),
          ekfac=("expand", "reduce"))


@pytest.mark.parametrize("lname,red", [("BCEWithLogitsLoss", "mean"), ("MSELoss", "sum")])
def test_curvlinops_mlp_on_sequences(lname, red):
    """test/cases.py: the same MLP on (N, 5, d) inputs, outputs (N, 5, c)."""
    torch.manual_seed(0)
    assert_agree(mlp(10, 5, 2), R(3, 5, 10), lname, red, kfac=("expand", "reduce"))


def test_curvlinops_weight_share_model():
    """test/cases.py, test/kfac_cases.py ``WeightShareModel``: per-token cross-entropy on
    (N, C, T) outputs (``movedim``), (N, 4, 8, 3) outputs kept, flattened and averaged."""
    torch.manual_seed(0)
    assert_agree(WeightShare(mlp(), class_first=True), R(3, 5, 10), "CrossEntropyLoss",
          kfac=("expand", "reduce"))
    for setting, approx in (("expand", "expand"), ("expand-flatten", "expand"),
                            ("reduce", "reduce")):
        assert_agree(WeightShare(tnn.Linear(5, 4), tnn.Linear(4, 3), setting=setting), R(2, 4, 8, 5),
              kfac=(approx,))


def test_curvlinops_weight_share_model_with_vmap_is_refused():
    """curvlinops' own forward maps an einops function over the batch with ``torch.vmap``:
    refused, naming the source line (refngd's rows need the ops, not a vmapped closure)."""
    msg = assert_refused(WeightShareVmap(tnn.Linear(5, 4), tnn.Linear(4, 3)), R(2, 4, 8, 5),
                  "torch.vmap(", "test_peer_models.py")
    assert "could not trace" in msg


@pytest.mark.parametrize("setting,einops_layer", [("expand", False), ("expand", True),
                                                  ("expand-flatten", False),
                                                  ("reduce", False)])
def test_curvlinops_conv2d_model(setting, einops_layer):
    """test/kfac_cases.py ``Conv2dModel`` (with einops' ``Rearrange`` layer too)."""
    torch.manual_seed(0)
    approx = ("reduce" if setting == "reduce" else "expand",)
    assert_agree(Conv2dSetting(setting, einops_layer), R(2, 3, 8, 8), kfac=approx,
          ekfac=approx if setting == "reduce" else ())


@pytest.mark.parametrize("lname,red", [("MSELoss", "sum"), ("CrossEntropyLoss", "mean"),
                                       ("BCEWithLogitsLoss", "mean")])
def test_curvlinops_unet_model(lname, red):
    """test/test_kfac.py ``test_expand_setting_scaling``'s ``UnetModel`` on 8 × 8 images:
    the layers see 4 × 4 and 8 × 8 positions."""
    torch.manual_seed(0)
    assert_agree(Unet(class_first=lname == "CrossEntropyLoss"), R(2, 3, 8, 8), lname, red,
          kfac=("expand", "reduce"))


@pytest.mark.parametrize("make", [lambda: SplitShared(4, bias=False),
                                  lambda: SplitShared(4, bias=True),
                                  lambda: SplitTied(4, True, False),
                                  lambda: SplitTied(4, True, True)],
                         ids=["shared", "shared-bias", "tied-mixed-bias", "tied-two-biases"])
def test_curvlinops_split_concat_models(make):
    """test/utils.py ``SplitConcatModel`` / ``WeightTiedSplitConcatModel``: the GGN agrees
    (a tied weight is one slice of θ); refngd's K-FAC refuses tied weights (curvlinops 3.0.1's
    hooks give wrong factors for them, its main branch's ``make_fx`` backend exact ones)."""
    torch.manual_seed(0)
    net = make()
    assert_agree(net, R(2, 8))
    model, theta = interop.from_torch(net, R(2, 8))
    with pytest.raises(TypeError, match="tied weights"):
        KFAC(model, theta, interop.from_torch_loss(tnn.MSELoss()), R(2, 8).numpy(),
             R(2, 8).numpy())


def test_curvlinops_cnn_dropout_batchnorm():
    """test/cases.py ``CNN_CASES`` and the Dropout / BatchNorm1d models (in ``eval()``)."""
    torch.manual_seed(0)
    assert_agree(cnn(), R(2, 1, 20, 20), "CrossEntropyLoss", kfac=("expand",), ekfac=("expand",))
    assert_agree(dropout_mlp(), R(3, 10), "CrossEntropyLoss", kfac=("expand",))
    assert_agree(batchnorm_mlp(), R(3, 10), "CrossEntropyLoss")


class _Unpack(tnn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net({"x": x})


def test_curvlinops_dict_input():
    """test/cases.py ``ModelWithDictInput``: a mapping as the example is refused with a
    message; a two-line wrapper that builds the mapping imports."""
    torch.manual_seed(0)
    net = DictInput(3).double()
    with pytest.raises(TypeError, match=r"a dict with keys \['x'\].*self.net\(\{'x': x\}\)"):
        interop.from_torch(net, {"x": R(3, 10)})
    with pytest.raises(TypeError, match="a tuple of 2 inputs"):
        interop.from_torch(net, (R(3, 10), R(3, 10)))
    assert_agree(_Unpack(net), R(3, 10), "CrossEntropyLoss", kfac=("expand",))


@pytest.mark.parametrize("lname", ["MSELoss", "CrossEntropyLoss"])
def test_curvlinops_functional_linear(lname):
    """test/cases.py ``_make_callable_case``: parameters passed to ``F.linear`` are Linear
    layers.  curvlinops 3.0.1's K-FAC (hooks) finds no layers in it: its K-FAC of the
    ``nn.Linear`` MLP with the same weights is the reference."""
    torch.manual_seed(0)
    net = FunctionalMLP()
    assert_agree(net, R(3, 10), lname)
    twin = mlp(10, 5, 3).double()
    with torch.no_grad():
        for lin, (W, b) in zip((twin[0], twin[2]), ((net.W1, net.b1), (net.W2, net.b2))):
            lin.weight.copy_(W), lin.bias.copy_(b)
    X = R(3, 10)
    model, theta = interop.from_torch(net, X)
    assert np.array_equal(theta, interop.from_torch(twin)[1])
    lm = getattr(tnn, lname)()
    y = _targets(lname, (3, 3))
    for approx in ("expand", "reduce"):
        K = curvlinops.KFACLinearOperator(twin, lm, list(twin.parameters()), [(X, y)],
                                          fisher_type="type-2", kfac_approx=approx,
                                          check_deterministic=False)
        mine = KFAC(model, theta, interop.from_torch_loss(lm), X.numpy(), y.numpy(),
                    kfac_approx=approx, convention="curvlinops").dense()
        assert rel(mine, (K @ torch.eye(theta.size, dtype=DT)).numpy()) <= 1e-10


class _TiedFunctional(tnn.Module):
    """curvlinops' test/computers/io_collector/test_kfac_io.py weight tying:
    ``linear(linear(x, W, b), W)``; and W also used directly (refused)."""

    def __init__(self, direct=False):
        super().__init__()
        self.W, self.b, self.direct = tnn.Parameter(torch.rand(3, 3)), tnn.Parameter(torch.rand(3)), direct

    def forward(self, x):
        h = F.linear(F.linear(x, self.W, bias=self.b), self.W)
        return h + self.W[0] if self.direct else h


def test_curvlinops_functional_linear_tied():
    torch.manual_seed(0)
    assert_agree(_TiedFunctional(), R(2, 3))
    assert_refused(_TiedFunctional(True), R(2, 3), "node 'linear' (call_function linear)",
            "'m.W' (of _TiedFunctional at 'm')", "used directly in 'linear' and another")


def test_curvlinops_refused_models():
    """Refused, naming the module, its path and setting: the batch axis flattened into the
    others (test/test_kfac.py; out of scope: refngd's rows are per sample)."""
    assert_refused(flatten_batch(), R(2, 4, 5), "Flatten at 'm.2'", "start_dim=0, end_dim=-2")


@pytest.mark.parametrize("make,shape,lname", [
    (InplaceActivation, (3, 3), "MSELoss"),
    (MultipleUsages, (3, 3), "MSELoss"),
    (FlattenNetwork, (3, 2, 2, 4), "MSELoss"),
    (Multiply, (2, 4), "MSELoss"),
    (Add, (3, 3), "MSELoss"),
    (PermuteNet, (3, 5, 3), "CrossEntropyLoss"),
    (lambda: PermuteNet(True), (3, 5, 3), "CrossEntropyLoss"),
    (EulerStep, (2, 2), "MSELoss")],
    ids=["inplace", "multiple-usages", "flatten", "multiply", "add", "permute", "transpose",
         "resnet1"])
def test_backpack_converter_models(make, shape, lname):
    """BackPACK's converter_cases.py and resnet_cases.py ``ResNet1``."""
    torch.manual_seed(1 if make is MultipleUsages else 0)  # seed 0: every output ReLU dead
    # curvlinops' EKFAC takes (N, C) outputs only
    assert_agree(make(), R(*shape), lname, kfac=("expand",),
          ekfac=("expand",) if lname == "MSELoss" else ())


def test_backpack_small_resnet():
    """resnet_cases.py ``ResNet2``: GGN-vector products (P = 3 165)."""
    torch.manual_seed(0)
    assert_agree(SmallResNet(), R(2, 3, 7, 7), vectors=2)


@pytest.mark.parametrize("make,shape", [(branching_linear, (3, 10)),
                                        (branching_conv, (2, 2, 6, 6)),
                                        (lambda: branching_conv(True), (2, 3, 6, 6))],
                         ids=["linear", "conv", "nested-conv"])
def test_backpack_branched_models(make, shape):
    """diag_ggn_settings.py, "Branched models": ``Parallel(Identity(), ...)`` skips."""
    torch.manual_seed(0)
    assert_agree(make(), R(*shape), "CrossEntropyLoss", kfac=("expand",), ekfac=("expand",))


def test_backpack_slicing_and_multi_axis_cross_entropy():
    """secondorder_settings.py: ``Slicing`` (steps, integer indices) and cross-entropy on
    (3, 4, 2, 3, 2) outputs (class axis 1)."""
    torch.manual_seed(0)
    assert_agree(sliced_cnn(), R(3, 3, 4, 5), "CrossEntropyLoss", kfac=("expand",), ekfac=("expand",))
    assert_agree(sliced_cnn(True), R(3, 3, 4, 5), kfac=("expand",))
    assert_agree(tnn.Sequential(tnn.Linear(5, 3), tnn.ReLU(), tnn.Linear(3, 2)), R(3, 4, 2, 3, 5),
          "CrossEntropyLoss", "sum", kfac=("expand",))


def test_backpack_pad_models():
    """secondorder_settings.py "Custom Pad mod": ``F.pad(mode="constant")``, and the
    modules ``nn.ZeroPad2d`` / ``nn.ConstantPad2d``; other modes and cropping refused."""
    torch.manual_seed(0)
    assert_agree(padded_cnn(), R(2, 3, 4, 4), kfac=("expand",), ekfac=("expand",))
    assert_agree(padded_cnn(True), R(2, 3, 4, 4), "CrossEntropyLoss", kfac=("expand",))
    interop.from_torch(padded_cnn().double())                 # symbolic trace, no example
    assert_agree(tnn.Sequential(tnn.Conv2d(3, 2, 2), tnn.ZeroPad2d((1, 1, 0, 2)),
                         tnn.ConstantPad2d(1, 0.5), tnn.Conv2d(2, 2, 3, stride=2),
                         tnn.Flatten(), tnn.Linear(18, 2)), R(2, 3, 4, 4), kfac=("expand",))

    class Reflect(tnn.Module):
        def forward(self, x):
            return F.pad(x, (1, 1), mode="reflect")

    assert_refused(tnn.Sequential(tnn.Conv2d(3, 2, 2), Reflect(), tnn.Flatten()), R(2, 3, 4, 4),
            "node 'pad' (call_function pad)", "pad(mode='reflect')")
    assert_refused(tnn.Sequential(tnn.Conv2d(3, 2, 2), Pad((-1, 0), 0.0), tnn.Flatten()),
            R(2, 3, 4, 4), "node 'pad'", "negative padding")
    assert_refused(tnn.Sequential(tnn.Conv2d(3, 2, 2), Pad((1,) * 8, 0.0), tnn.Flatten()),
            R(2, 3, 4, 4), "node 'pad'", "must pad axes after the batch axis")


@pytest.mark.parametrize("cell", [tnn.LSTM, tnn.RNN], ids=["lstm", "rnn"])
def test_backpack_recurrent_models_are_refused(cell):
    """``_TolstoiCharRNN`` / ``_TolstoiRNNVersion``: refngd has no recurrent layers; refused
    naming the module and its path."""
    assert_refused(CharRNN(cell=cell), torch.randint(0, 5, (2, 4)), f"{cell.__name__} at 'm.lstm'")


def test_movedim_and_arithmetic_aliases():
    """``movedim`` / ``moveaxis`` (curvlinops' "... c -> c ..." rearrangement) and
    ``multiply`` / ``divide`` / ``subtract`` (BackPACK's ``_Multiply``) import; moving the
    batch axis is refused."""

    class Moves(tnn.Module):
        def __init__(self):
            super().__init__()
            self.lin = tnn.Linear(3, 2)

        def forward(self, x):
            h = torch.movedim(self.lin(x), (1, 3), (3, 2))
            h = h.moveaxis(-1, 1).subtract(0.5).divide(2.0)
            return torch.multiply(h, 3.0).flatten(1)

    class MovesBatch(Moves):
        def forward(self, x):
            return self.lin(x).movedim(0, 1).flatten(1)

    torch.manual_seed(0)
    assert_agree(Moves(), torch.randn(2, 4, 5, 3, 3), kfac=("expand",))
    assert_refused(MovesBatch(), torch.randn(2, 4, 3), "node 'movedim' (call_method movedim)",
            "movedim over axis 0, the batch axis")


def test_functional_linear_layers_have_names_of_their_own():
    """Two F.linear layers of one module's parameters (W1, b1; W2, b2) share the module's
    empty prefix: the check names each by its weight, never both "" (a K-FAC factor of
    one would overwrite the other's)."""
    from refngd import check

    torch.manual_seed(0)
    net, X, y = FunctionalMLP().double(), R(3, 10), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"expected keys \['W1.A', 'W1.G', 'W2.A', 'W2.G'\]"):
        check.validate(net, tnn.CrossEntropyLoss(), X, y, "kfac_factors", {"x.A": np.eye(2)})
    model, theta = interop.from_torch(net, X)
    K = KFAC(model, theta, interop.from_torch_loss(tnn.CrossEntropyLoss()), X.numpy(), y.numpy())
    assert check.validate(net, tnn.CrossEntropyLoss(), X, y, "kfac", K.dense()).passed

import pytest
import torch
from torch import nn

from backproplab.models import ACTIVATIONS, build_model

SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "cifar": (3, 32, 32)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name,kwargs", [("mlp", {}), ("cnn", {}), ("cnn", {"batchnorm": True}),
                                         ("vgg11", {"width": 0.125}), ("vgg11_bn", {"width": 0.125}),
                                         ("resnet18", {"width": 0.125})])
def test_models_build_and_run(name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **kwargs)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


class _RecordFunctions(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["mlp", "cnn", "vgg11", "resnet18"])
def test_activations_are_swappable_modules(name):
    """After swapping every ReLU module for Identity no relu is computed: none is hidden in a forward()."""
    kwargs = {} if name in ("mlp", "cnn") else {"width": 0.125}
    model = build_model(name, (3, 16, 16), 5, **kwargs).eval()
    x = torch.randn(4, 3, 16, 16)
    with _RecordFunctions() as before:
        model(x)
    assert "relu" in before.names
    acts = [(parent, n) for parent in model.modules() for n, c in parent.named_children() if isinstance(c, nn.ReLU)]
    for parent, n in acts:
        setattr(parent, n, nn.Identity())
    with _RecordFunctions() as after:
        model(x)
    assert "relu" not in after.names and "relu_" not in after.names


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_mlp_activation_by_name(act):
    model = build_model("mlp", (4,), 2, widths=(8,), activation=act)
    assert isinstance(model.body[2], ACTIVATIONS[act])


def test_vgg11_layout():
    model = build_model("vgg11_bn", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5


def test_resnet18_cifar_stem_and_size():
    model = build_model("resnet18", (3, 32, 32), 10)
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert 11.1e6 < sum(p.numel() for p in model.parameters()) < 11.2e6  # the CIFAR ResNet-18 count


def test_unknown_names_are_reported():
    with pytest.raises(ValueError, match="available"):
        build_model("alexnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="available"):
        build_model("mlp", (4,), 2, activation="swoosh")
    with pytest.raises(ValueError, match="flat inputs"):
        build_model("cnn", (4,), 2)


@pytest.mark.medium
def test_binary_vgg_binarizes_weights_and_activations_with_straight_through_gradients():
    """Forward: every hidden activation is +-1 and each layer uses sign(W); backward: the weight gradient is
    the gradient w.r.t. sign(W) masked by |W| <= 1 (the clipped straight-through estimator), checked against
    autograd through an explicit binarized copy of the weights."""
    import torch.nn.functional as F

    from backproplab.models import BinaryConv, BinaryLinear, Sign, build_model

    torch.manual_seed(0)
    model = build_model("binary_vgg", (1, 8, 8), 10, channels=(4, 8), hidden=16).train()
    x = torch.randn(6, 1, 8, 8)
    seen = []
    for m in model.modules():
        if isinstance(m, Sign):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out))
    conv = model.body[0]
    assert isinstance(conv, BinaryConv) and isinstance(model.head[0], BinaryLinear)
    with torch.no_grad():
        conv.weight.mul_(4)  # some weights beyond |w| <= 1: their straight-through gradient is zero
    model(x)
    assert len(seen) == 5 and all(set(o.unique().tolist()) <= {-1.0, 1.0} for o in seen)
    binary = torch.where(conv.weight >= 0, 1.0, -1.0).detach().requires_grad_()
    expected_out = F.conv2d(x, binary, None, padding=1)
    out = conv(x)
    torch.testing.assert_close(out, expected_out)
    cotangent = torch.randn_like(out)
    (g_binary,) = torch.autograd.grad(expected_out, binary, cotangent)
    (g_real,) = torch.autograd.grad(out, conv.weight, cotangent)
    assert (conv.weight.abs() > 1).any() and (conv.weight.abs() <= 1).any()
    torch.testing.assert_close(g_real, g_binary * (conv.weight.abs() <= 1))


@pytest.mark.parametrize("shape,features", [((1, 28, 28), 160), ((1, 8, 8), 40), ((1, 40), 70)])
def test_wu_cnn_is_the_msgd_authors_network(shape, features):
    """conv 1->10 5x5, pool, ReLU, conv 10->10 5x5, pool, ReLU, fc 160->50 on 28x28 (their Fashion-MNIST
    net), every parameter N(0, 0.02^2)."""
    torch.manual_seed(0)
    model = build_model("wu_cnn", shape, 10)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(1, 10, 5), (10, 10, 5)]
    assert model.classifier[1].in_features == features and model.classifier[1].out_features == 50
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert abs(float(flat.std()) - 0.02) < 0.002 and abs(float(flat.mean())) < 0.002


@pytest.mark.parametrize("length", [8, 9])
def test_pairwise_max_pool_equals_torchs_max_pool_in_outputs_and_gradients(length):
    """Against nn.MaxPool1d(2), bitwise: post-ReLU inputs (ties at 0), ties at positive values, a NaN, an odd length
    (the last element dropped); every other setting falls back to torch's pooling itself."""
    from backproplab.models import PairwiseMaxPool1d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, length, generator=g, dtype=torch.float64).relu()
    x[0, 0, :2] = 0.7  # a tie at a positive value: the first of the pair takes the gradient
    x[1, 2, 3] = float("nan")
    for fast, reference in ((PairwiseMaxPool1d(2), nn.MaxPool1d(2)),
                            (PairwiseMaxPool1d(3, stride=1, padding=1), nn.MaxPool1d(3, stride=1, padding=1)),
                            (PairwiseMaxPool1d(2, ceil_mode=True), nn.MaxPool1d(2, ceil_mode=True))):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fast(a), reference(b)
        assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
        cotangent = torch.randn(ya.shape, generator=g, dtype=torch.float64)
        ya.backward(cotangent)
        yb.backward(cotangent)
        assert torch.equal(a.grad, b.grad)


def test_the_small_cnn_pools_1d_signals_pairwise():
    from backproplab.models import PairwiseMaxPool1d

    model = build_model("cnn", (1, 40), 10)
    assert sum(isinstance(m, PairwiseMaxPool1d) and m.pairwise() for m in model.modules()) == 2

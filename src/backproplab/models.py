"""Model zoo by name: ``build_model(name, input_shape, num_classes, **kwargs)``.

Every model is a plain ``nn.Module`` whose activations are module instances (so a transform such as
linear backprop can swap them) and whose final linear layer is the attribute ``head`` (so a callback
such as RIFLE can re-initialise it). Convolutional models work on 1-D inputs ``(C, L)`` and 2-D
inputs ``(C, H, W)`` alike; pooling stops once a spatial side reaches 1, so 8x8 digits fit too.

  ``mlp``      widths=(256, 256), activation="relu"
  ``cnn``      channels=(32, 64), hidden=128, batchnorm=False, activation="relu": conv-act-pool stages
  ``vgg11``    VGG-11 (Simonyan & Zisserman 2015) CIFAR variant, width multiplier ``width``
  ``vgg11_bn`` the same with BatchNorm after every convolution
  ``resnet18`` ResNet-18 (He et al. 2016) with the CIFAR 3x3 stem, width multiplier ``width``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

class _SignSTE(torch.autograd.Function):
    """sign(x) forward; straight-through gradient 1_{|x| <= 1} (Hubara, Courbariaux et al. 2016)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return tangent * (x.abs() <= 1).to(tangent.dtype)


class Sign(nn.Module):
    """Binary activation sign(x) with the clipped straight-through estimator as its derivative.

    Example:
        >>> import torch
        >>> x = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
        >>> y = Sign()(x)
        >>> y.sum().backward()
        >>> y.tolist(), x.grad.tolist()                 # gradient 1 inside [-1, 1], 0 outside
        ([-1.0, -1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0])

    References:
        Hubara, Courbariaux, Soudry, El-Yaniv and Bengio, "Binarized neural networks", NeurIPS 2016.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardtanh": nn.Hardtanh, "softplus": nn.Softplus,
    "sign": Sign, "identity": nn.Identity,
}

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Register ``fn(input_shape, num_classes, **kwargs) -> nn.Module`` under ``name`` for :func:`build_model`.

    Example:
        >>> import torch
        >>> @register_model("tiny_linear")
        ... def tiny_linear(input_shape, num_classes):
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        >>> tuple(build_model("tiny_linear", (1, 2, 2), 3)(torch.zeros(5, 1, 2, 2)).shape)
        (5, 3)
        >>> del MODELS["tiny_linear"]
    """
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (no batch dim) and ``num_classes`` outputs.

    Example:
        >>> import torch
        >>> model = build_model("cnn", (1, 8, 8), 10, channels=(8, 16))
        >>> tuple(model(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)


def get_activation(name: str) -> type[nn.Module]:
    """The activation module class registered under ``name`` (``ACTIVATIONS``).

    Example:
        >>> get_activation("relu") is nn.ReLU
        True
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; available: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


class PairwiseMaxPool1d(nn.MaxPool1d):
    """``nn.MaxPool1d(2)`` computed as the maximum of each pair: y_j = max(x_2j, x_2j+1), a trailing odd element
    dropped, as PyTorch's pooling does. Outputs and gradients are the same (both take each window's first maximum);
    it is faster because PyTorch runs 1-D max pooling as 2-D pooling with indices, a slow path on contiguous
    tensors: 39% of a full-batch step of the small CNN on MNIST-1D (issue #38; 26.2 -> 20.5 ms a step). Any other
    setting (kernel, stride, padding, dilation, ceil_mode, return_indices) runs ``nn.MaxPool1d`` itself.
    CurveBall's tangent replay reads the pair's argmax from this forward's own autograd node.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3, 9, requires_grad=True)
        >>> torch.equal(PairwiseMaxPool1d(2)(x), nn.MaxPool1d(2)(x))
        True
    """

    def pairwise(self) -> bool:
        return (self.kernel_size, self.stride, self.padding, self.dilation) == (2, 2, 0, 1) and not (
            self.ceil_mode or self.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pairwise():
            return super().forward(x)
        return x[..., :x.shape[-1] - x.shape[-1] % 2].unflatten(-1, (-1, 2)).max(-1).values


def _layers(input_shape: Sequence[int]) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    """(Conv, BatchNorm, MaxPool, AdaptiveAvgPool) for 1-D or 2-D inputs."""
    if len(input_shape) == 2:
        return nn.Conv1d, nn.BatchNorm1d, PairwiseMaxPool1d, nn.AdaptiveAvgPool1d
    if len(input_shape) == 3:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    raise ValueError(f"convolutional models take inputs (C, L) or (C, H, W), got shape {tuple(input_shape)}; "
                     "use model=mlp for flat inputs")


class MLP(nn.Module):
    """Flatten, then Linear -> activation per hidden width, then a linear ``head``.

    Example:
        >>> import torch
        >>> mlp = MLP((1, 8, 8), 10, widths=(32, 16))
        >>> tuple(mlp(torch.zeros(4, 1, 8, 8)).shape), sum(p.numel() for p in mlp.parameters())
        ((4, 10), 2778)
    """
    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (256, 256),
                 activation: str = "relu"):
        super().__init__()
        act = get_activation(activation)
        dims = [math.prod(input_shape), *widths]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, o in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(i, o), act()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Convolution blocks (conv 3x3, optional BatchNorm, activation, 2x max-pool) of ``channels``, then a hidden
    linear layer and the classifier ``head``; 1-D or 2-D inputs (``input_shape`` = (C, L) or (C, H, W)).

    Example:
        >>> import torch
        >>> model = SmallCNN((1, 8, 8), 10, channels=(4, 8), hidden=16)
        >>> tuple(model(torch.randn(2, 1, 8, 8)).shape), model.head.out_features
        ((2, 10), 10)
        >>> tuple(SmallCNN((1, 40), 10, channels=(4,), hidden=16)(torch.randn(2, 1, 40)).shape)   # 1-D signals
        (2, 10)
    """
    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
                 hidden: int = 128, batchnorm: bool = False, activation: str = "relu"):
        super().__init__()
        act = get_activation(activation)
        conv, bn, pool, _ = _layers(input_shape)
        c, spatial = input_shape[0], list(input_shape[1:])
        layers: list[nn.Module] = []
        for width in channels:
            layers += [conv(c, width, 3, padding=1, bias=not batchnorm)]
            layers += [bn(width)] if batchnorm else []
            layers += [act()]
            if min(spatial) >= 2:
                layers += [pool(2)]
                spatial = [s // 2 for s in spatial]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * math.prod(spatial), hidden), act())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.features(x)))


class WuCNN(nn.Module):
    """The MSGD authors' small CNN (Wu et al., ICML 2020, their Fashion-MNIST network): conv 1->10 5x5,
    max-pool 2, ReLU, conv 10->10 5x5, max-pool 2, ReLU, linear -> 50, ReLU, linear 50 -> classes, every
    weight and bias drawn from N(0, ``init_std``^2) (their 0.02). On 28x28 inputs the flattened features
    are their 160; inputs under 16 wide (digits' 8x8) get padding 2 so both 5-wide convolutions fit.

    Example:
        >>> import torch
        >>> model = WuCNN((1, 28, 28), 10)
        >>> tuple(model(torch.randn(2, 1, 28, 28)).shape)
        (2, 10)
        >>> abs(float(torch.cat([p.detach().flatten() for p in model.parameters()]).std()) - 0.02) < 0.002
        True

    References:
        Wu, Hu, Xiong, Huan, Braverman and Zhu, "On the noisy gradient descent that generalizes as SGD",
        ICML 2020.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (10, 10),
                 hidden: int = 50, init_std: float = 0.02):
        super().__init__()
        conv, _, pool, _ = _layers(input_shape)
        pad = 0 if min(input_shape[1:]) >= 16 else 2
        c, spatial, layers = input_shape[0], list(input_shape[1:]), []
        for width in channels:
            layers += [conv(c, width, 5, padding=pad), pool(2), nn.ReLU()]
            spatial = [(s + 2 * pad - 4) // 2 for s in spatial]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * math.prod(spatial), hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.features(x)))


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """Stages of 3x3 convolutions (``config``: widths, and "M" for a 2x max-pool), global average pooling and a
    linear ``head``; ``width`` scales every stage.

    Example:
        >>> import torch
        >>> model = VGG((3, 32, 32), 10, width=0.125)
        >>> tuple(model(torch.randn(2, 3, 32, 32)).shape)
        (2, 10)

    References:
        Simonyan and Zisserman, "Very deep convolutional networks for large-scale image recognition", ICLR 2015.
    """
    def __init__(self, input_shape: Sequence[int], num_classes: int, config: Sequence = VGG11,
                 batchnorm: bool = False, width: float = 1.0, activation: str = "relu"):
        super().__init__()
        act = get_activation(activation)
        conv, bn, pool, avg = _layers(input_shape)
        c, spatial = input_shape[0], list(input_shape[1:])
        layers: list[nn.Module] = []
        for item in config:
            if item == "M":
                if min(spatial) >= 2:
                    layers.append(pool(2))
                    spatial = [s // 2 for s in spatial]
                continue
            out = max(1, int(round(item * width)))
            layers += [conv(c, out, 3, padding=1, bias=not batchnorm)]
            layers += [bn(out)] if batchnorm else []
            layers += [act()]
            c = out
        self.features = nn.Sequential(*layers, avg(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)
        for m in self.modules():  # torchvision's VGG initialisation; without it the plain VGG barely trains
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and the identity (or a 1x1 projection) added back.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> block = BasicBlock(nn.Conv2d, nn.BatchNorm2d, nn.ReLU, 4, 8, stride=2)
        >>> tuple(block(torch.randn(2, 4, 8, 8)).shape)
        (2, 8, 4, 4)

    References:
        He, Zhang, Ren and Sun, "Deep residual learning for image recognition", CVPR 2016.
    """
    def __init__(self, conv, bn, act, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(c_out)
        self.act1 = act()
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = bn(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), bn(c_out))
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's layout with the CIFAR stem (one 3x3 convolution, no max-pool); ``width`` scales the stages.

    Example:
        >>> import torch
        >>> model = ResNet((3, 32, 32), 10, width=0.125)
        >>> tuple(model(torch.randn(2, 3, 32, 32)).shape)
        (2, 10)

    References:
        He, Zhang, Ren and Sun, "Deep residual learning for image recognition", CVPR 2016.
    """
    def __init__(self, input_shape: Sequence[int], num_classes: int, blocks: Sequence[int] = (2, 2, 2, 2),
                 width: float = 1.0, activation: str = "relu"):
        super().__init__()
        act = get_activation(activation)
        conv, bn, _, avg = _layers(input_shape)
        widths = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
        self.stem = nn.Sequential(conv(input_shape[0], widths[0], 3, padding=1, bias=False), bn(widths[0]), act())
        stages, c = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stages.append(nn.Sequential(*[BasicBlock(conv, bn, act, c if j == 0 else w, w,
                                                     (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]))
            c = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(avg(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.layers(self.stem(x))))


class _BinaryWeight(torch.autograd.Function):
    """sign(w) forward; the clipped straight-through estimator backward (BinaryConnect, Courbariaux et al. 2015),
    and the same derivative forward (``jvp``), so forward-mode AD (CurveBall's J z) follows it too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w: torch.Tensor) -> torch.Tensor:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return tangent * (w.abs() <= 1).to(tangent.dtype)


class BinaryConv(nn.Conv2d):
    """A convolution whose weights are binarized to +-1 in the forward pass (real-valued weights are the
    ones trained, through the straight-through estimator); no bias (BatchNorm follows).

    Example:
        >>> import torch
        >>> conv = BinaryConv(1, 1, 2, bias=False)
        >>> x = torch.ones(1, 1, 2, 2)
        >>> conv(x).item() == torch.where(conv.weight >= 0, 1.0, -1.0).sum().item()   # +-1 weights on a ones input
        True

    References:
        Courbariaux, Bengio and David, "BinaryConnect: Training deep neural networks with binary weights during
        propagations", NeurIPS 2015.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _BinaryWeight.apply(self.weight), None)


class BinaryLinear(nn.Linear):
    """A linear layer with binarized weights (see :class:`BinaryConv`).

    Example:
        >>> import torch
        >>> layer = BinaryLinear(3, 1, bias=False)
        >>> x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        >>> out = layer(x)
        >>> torch.equal(out, x.detach() @ torch.where(layer.weight >= 0, 1.0, -1.0).T)
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _BinaryWeight.apply(self.weight), None)


class BinaryVGG(nn.Module):
    """A binarized VGG-style network (Hubara et al. 2016 / Courbariaux et al. 2016 layout): binary weights
    in every convolution and linear layer, BatchNorm after each, and binary (Sign) activations between
    them; the input stays real-valued. Stages of two 3x3 convolutions and a 2x2 max-pool, then a hidden
    binary linear layer and the classifier (BatchNorm on the logits, as in BinaryNet).

    Example:
        >>> import torch
        >>> model = BinaryVGG((1, 8, 8), 10, channels=(8, 16), hidden=32)
        >>> tuple(model(torch.randn(4, 1, 8, 8)).shape)
        (4, 10)

    References:
        Hubara et al., "Binarized neural networks", NeurIPS 2016; Courbariaux et al., BinaryConnect, NeurIPS 2015.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
                 hidden: int = 128):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"binary_vgg takes (C, H, W) inputs, got {tuple(input_shape)}")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for width in channels:
            for _ in range(2):
                layers += [BinaryConv(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), Sign()]
                c = width
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        layers += [nn.Flatten(), BinaryLinear(c * h * w, hidden, bias=False), nn.BatchNorm1d(hidden), Sign()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(BinaryLinear(hidden, num_classes, bias=False), nn.BatchNorm1d(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


register_model("mlp")(MLP)
register_model("binary_vgg")(BinaryVGG)
register_model("cnn")(SmallCNN)
register_model("wu_cnn")(WuCNN)
register_model("vgg11")(lambda shape, k, **kw: VGG(shape, k, VGG11, batchnorm=False, **kw))
register_model("vgg11_bn")(lambda shape, k, **kw: VGG(shape, k, VGG11, batchnorm=True, **kw))
register_model("resnet18")(ResNet)

"""Greedy layerwise learning: a CNN built block by block from shallow auxiliary problems.

Belilovsky, Eickenberg, Oyallon, "Greedy Layerwise Learning Can Scale to ImageNet", ICML 2019 (arXiv
1812.11446; the ICLR 2019 submission "Shallow Learning For Deep Networks"). Block j is trained on a shallow
supervised problem, block j followed by an auxiliary classifier with k hidden layers, while blocks 1..j-1 are
frozen (eval mode, BatchNorm statistics fixed); then block j+1 is added.

* Block: optional invertible downsampling (Dinh et al. 2017's space-to-depth "squeeze"), a 3x3 convolution
  (stride 1, pad 1), optional BatchNorm, ReLU. A downsampling block maps the 4C (2-D) or 2C (1-D) squeezed
  channels to 2C output channels. No pooling in the trunk.
* Auxiliary classifier for k: k - 1 convolutions of constant width (3x3, ReLU), spatial averaging to a 2x2
  (2-D) or length-2 (1-D) map, a linear layer. k = 1 is a linear model on the averaged features.
* The final model is the trunk plus the last block's auxiliary classifier.

:class:`InvertibleDownsample` orders channels by sub-pixel position first: output channel
``s * C + c`` holds input channel c at sub-pixel s = 2 i + j (row offset i, column offset j). That is
``nn.PixelUnshuffle(2)`` (channel ``c * 4 + s``) followed by the fixed permutation
:func:`pixel_unshuffle_order`; 1-D inputs use s = the offset in {0, 1}.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..data import Data
from ..streams import derive_seed
from ..train import TrainConfig, cross_entropy, evaluate, evaluate_batches, fit, seed_everything


def pixel_unshuffle_order(channels: int, dims: int = 2) -> Tensor:
    """perm such that ``InvertibleDownsample(x) == pixel_unshuffle(x, 2)[:, perm]``.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 4)
        >>> mine = InvertibleDownsample()(x)
        >>> torch.equal(mine, torch.nn.functional.pixel_unshuffle(x, 2)[:, pixel_unshuffle_order(3)])
        True
    """
    sub = 2**dims
    return torch.tensor([c * sub + s for s in range(sub) for c in range(channels)])


class InvertibleDownsample(nn.Module):
    """Space-to-depth by 2 (lossless): (C, H, W) -> (4C, H/2, W/2) or (C, L) -> (2C, L/2).

    Example:
        >>> import torch
        >>> x = torch.arange(16.).view(1, 1, 4, 4)
        >>> y = InvertibleDownsample()(x)
        >>> tuple(y.shape), sorted(y.flatten().tolist()) == x.flatten().tolist()   # nothing lost
        ((1, 4, 2, 2), True)

    References:
        Belilovsky, Eickenberg and Oyallon, "Greedy layerwise learning can scale to ImageNet", ICML 2019
        (arXiv:1812.11446); Jacobsen, Smeulders and Oyallon, "i-RevNet", ICLR 2018 (the downsampling).
    """

    def __init__(self, dims: int = 2):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 2:
            n, c, h, w = x.shape
            if h % 2 or w % 2:
                raise ValueError(f"invertible downsampling needs even sides, got {h}x{w}")
            y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)  # n, i, j, c, h/2, w/2
            return y.reshape(n, 4 * c, h // 2, w // 2)
        n, c, length = x.shape
        if length % 2:
            raise ValueError(f"invertible downsampling needs an even length, got {length}")
        return x.view(n, c, length // 2, 2).permute(0, 3, 1, 2).reshape(n, 2 * c, length // 2)

    def inverse(self, y: Tensor) -> Tensor:
        if self.dims == 2:
            n, c4, h, w = y.shape
            c = c4 // 4
            return y.view(n, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, 2 * h, 2 * w)
        n, c2, length = y.shape
        c = c2 // 2
        return y.view(n, 2, c, length).permute(0, 2, 3, 1).reshape(n, c, 2 * length)


def _nd(dims: int):
    return (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d,
                                                                                nn.AdaptiveAvgPool2d)


class Block(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, dims: int, downsample: bool, batchnorm: bool):
        conv, bn, _ = _nd(dims)
        layers: list[nn.Module] = []
        if downsample:
            layers.append(InvertibleDownsample(dims))
            c_in *= 2**dims
        layers.append(conv(c_in, c_out, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(bn(c_out))
        layers.append(nn.ReLU())
        super().__init__(*layers)


class AuxClassifier(nn.Sequential):
    """k - 1 conv layers (3x3, ReLU) of width ``width``, average to 2x2 (or 2), linear to the classes.

    ``batchnorm``: BatchNorm after each auxiliary convolution and on the averaged features before the
    linear layer, as in the paper and the authors' code for k > 1; ``None`` (default) is the paper's
    setting: on for k > 1, off for k = 1 (a plain linear model on the averaged features).

    Example:
        >>> import torch
        >>> aux = AuxClassifier(c_in=8, num_classes=10, k=2, dims=2)
        >>> tuple(aux(torch.randn(3, 8, 4, 4)).shape)
        (3, 10)
    """

    def __init__(self, c_in: int, num_classes: int, k: int, dims: int, width: int | None = None,
                 batchnorm: bool | None = None):
        conv, bn, avg = _nd(dims)
        batchnorm = k > 1 if batchnorm is None else batchnorm
        width = width or c_in
        layers: list[nn.Module] = []
        c = c_in
        for _ in range(k - 1):
            layers += [conv(c, width, 3, padding=1, bias=not batchnorm)]
            layers += [bn(width)] if batchnorm else []
            layers.append(nn.ReLU())
            c = width
        layers += [avg(2), nn.Flatten()]
        layers += [nn.BatchNorm1d(c * 2**dims)] if batchnorm else []
        layers.append(nn.Linear(c * 2**dims, num_classes))
        super().__init__(*layers)

    @property
    def conv_layers(self) -> int:
        return sum(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in self)


class BlockStack(nn.Module):
    """Any trunk of blocks with one auxiliary classifier per block; ``forward`` = trunk + the last
    auxiliary classifier. What :class:`GreedyLayerwiseTrainer` trains: build one from your own stages,
    ``BlockStack([stage1, stage2], [head1, head2])``, each head taking its block's output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> blocks = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
        >>> stack = BlockStack(blocks, [nn.Linear(8, 3), nn.Linear(8, 3)])
        >>> x = torch.randn(5, 4)
        >>> torch.equal(stack(x), stack.aux[1](blocks[1](blocks[0](x))))           # the trunk, then the last head
        True
        >>> torch.equal(stack.truncated(1)(x), stack.aux[0](blocks[0](x)))        # the network after stage 1
        True
        >>> BlockStack(blocks, [nn.Linear(8, 3)])
        Traceback (most recent call last):
        ...
        ValueError: greedy layerwise training needs one auxiliary classifier per block; got 2 blocks and 1 auxiliary ...

    References:
        Belilovsky, Eickenberg and Oyallon, ICML 2019 (arXiv:1812.11446), Section 3.
    """

    def __init__(self, blocks: Sequence[nn.Module], aux: Sequence[nn.Module]):
        super().__init__()
        if len(blocks) != len(aux) or not blocks:
            raise ValueError(f"greedy layerwise training needs one auxiliary classifier per block; got {len(blocks)} "
                             f"blocks and {len(aux)} auxiliary classifiers")
        self.blocks = nn.ModuleList(blocks)
        self.aux = nn.ModuleList(aux)

    def features(self, x: Tensor, depth: int | None = None) -> Tensor:
        for block in self.blocks[: len(self.blocks) if depth is None else depth]:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.aux[-1](self.features(x))

    def truncated(self, depth: int) -> nn.Module:
        """Blocks 1..depth followed by aux classifier ``depth`` (the network after stage ``depth``)."""
        return nn.Sequential(*self.blocks[:depth], self.aux[depth - 1])


class LayerwiseCNN(BlockStack):
    """The paper's trunk of blocks, one auxiliary classifier per block; ``forward`` = trunk + the last aux classifier.

    Args:
        input_shape: (C, L) or (C, H, W). widths: output channels of each block. downsample: indices of the
        blocks that start with invertible downsampling. k: hidden layers of the auxiliary classifiers.
        aux_batchnorm: BatchNorm in the auxiliary classifiers (default: the paper's, on for k > 1).

    Example:
        >>> import torch
        >>> net = LayerwiseCNN((1, 8, 8), 10, widths=(8, 16), downsample=(1,), k=2)
        >>> tuple(net(torch.randn(5, 1, 8, 8)).shape), len(net.blocks), len(net.aux)
        ((5, 10), 2, 2)

    References:
        Belilovsky, Eickenberg and Oyallon, ICML 2019 (arXiv:1812.11446), Section 3.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (32, 64, 64, 128),
                 downsample: Sequence[int] = (1, 3), k: int = 1, batchnorm: bool = True, aux_width: int | None = None,
                 aux_batchnorm: bool | None = None):
        dims = len(input_shape) - 1
        if dims not in (1, 2):
            raise ValueError(f"LayerwiseCNN takes (C, L) or (C, H, W) inputs, got {tuple(input_shape)}")
        blocks, aux = [], []
        c = input_shape[0]
        for j, w in enumerate(widths):
            blocks.append(Block(c, w, dims, j in downsample, batchnorm))
            aux.append(AuxClassifier(w, num_classes, k, dims, aux_width, aux_batchnorm))
            c = w
        super().__init__(blocks, aux)
        self.dims, self.k = dims, k


class _Stage(nn.Module):
    """What stage j trains: (frozen prefix, unless inputs are cached) -> block j -> aux j."""

    def __init__(self, prefix: nn.Module | None, block: nn.Module, aux: nn.Module):
        super().__init__()
        self.prefix, self.block, self.aux = prefix, block, aux

    def train(self, mode: bool = True):
        super().train(mode)
        if self.prefix is not None:
            self.prefix.eval()  # frozen blocks: BatchNorm statistics fixed
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.prefix is not None:
            with torch.no_grad():
                x = self.prefix(x)
        return self.aux(self.block(x))


@torch.no_grad()
def _features(module: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    module.eval()
    return torch.cat([module(x[s:s + batch]) for s in range(0, len(x), batch)])


class GreedyLayerwiseTrainer:
    """Train ``model`` block after block with the foundation's loop.

    ``model``: a :class:`BlockStack` (:class:`LayerwiseCNN` is one), or a list of blocks (e.g.
    ``nn.Sequential`` stages) with ``aux=`` one auxiliary classifier per block. While block j trains,
    blocks 1..j-1 are frozen (no gradients, eval mode); when :meth:`train` returns, every parameter is
    trainable again, so the model can be fine-tuned end to end like any ``nn.Module``.

    ``cache_prefix=True`` computes the frozen prefix's outputs once per stage (valid without data
    augmentation, since the prefix is frozen and in eval mode), so block j does not recompute blocks
    1..j-1 for every batch; ``False`` recomputes them (needed with augmentation).

    Example:
        >>> from backproplab import load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=200)
        >>> net = LayerwiseCNN(data.input_shape, 10, widths=(8, 16), downsample=(1,), k=1)
        >>> rows = GreedyLayerwiseTrainer(net, TrainConfig(lr=0.05, epochs=1, batch_size=50)).train(data)
        >>> [r["depth"] for r in rows], all(p.requires_grad for p in net.parameters())
        ([1, 2], True)

    References:
        Belilovsky, Eickenberg and Oyallon, ICML 2019 (arXiv:1812.11446), Algorithm 1.
    """

    def __init__(self, model: BlockStack | Sequence[nn.Module], config: TrainConfig, cache_prefix: bool = True,
                 callbacks=(), *, aux: Sequence[nn.Module] | None = None):
        if not isinstance(model, BlockStack):
            if aux is None or isinstance(model, nn.Module) and not isinstance(model, (nn.Sequential, nn.ModuleList)):
                raise TypeError("GreedyLayerwiseTrainer takes a BlockStack (e.g. LayerwiseCNN), or a list of blocks "
                                "with aux= one auxiliary classifier per block")
            model = BlockStack(list(model), list(aux))
        elif aux is not None:
            raise TypeError("aux= is for a list of blocks; a BlockStack has its own auxiliary classifiers")
        self.model, self.config, self.cache_prefix, self.callbacks = model, config, cache_prefix, callbacks

    def train_stage(self, j: int, data: Data | Iterable, out_dir=None, resume: bool = True,
                    eval_data: Iterable | None = None) -> list[dict]:
        """Train block j (and its auxiliary classifier) with blocks 1..j-1 frozen, by ``fit``."""
        m = self.model
        for b in m.blocks[:j]:
            b.requires_grad_(False)
            b.eval()
            for p in b.parameters():
                p.grad = None
        prefix = nn.Sequential(*m.blocks[:j]) if j else None
        if self.cache_prefix and prefix is not None and isinstance(data, Data):
            stage = _Stage(None, m.blocks[j], m.aux[j])
            data = replace(data, x_train=_features(prefix, data.x_train), x_test=_features(prefix, data.x_test))
        else:
            stage = _Stage(prefix, m.blocks[j], m.aux[j])
        # stage j shuffles from its own stream (seed + j would give seed k's stage 1 seed k + 1's stage 0 order)
        stage_seed = derive_seed(self.config.seed, "layerwise-stage", j)
        return fit(stage, data, replace(self.config, seed=stage_seed), callbacks=self.callbacks,
                   out_dir=out_dir, resume=resume, eval_data=eval_data)

    def train(self, data: Data | Iterable, out_dir=None, resume: bool = True,
              eval_data: Iterable | None = None) -> list[dict]:
        """All stages; returns one record per depth: test accuracy of the truncated network after stage j.

        ``data``: a :class:`Data` (evaluated on its test split), or any iterable of ``(x, y)`` batches such as a
        ``DataLoader`` with ``eval_data=`` the batches to evaluate on (without it, a record has the training loss
        only). With batches the frozen prefix is recomputed for every batch (``cache_prefix`` needs a ``Data``)."""
        in_memory = isinstance(data, Data)
        records = []
        try:
            for j in range(len(self.model.blocks)):
                stage_dir = Path(out_dir) / f"block{j + 1}" if out_dir is not None else None
                history = self.train_stage(j, data, stage_dir, resume, eval_data=None if in_memory else eval_data)
                net = self.model.truncated(j + 1)
                device = next(net.parameters()).device
                record = {"depth": j + 1, "stage_train_loss": history[-1]["train_loss"]}
                if in_memory or eval_data is not None:
                    test = (evaluate(net, data.x_test.to(device), data.y_test.to(device), cross_entropy) if in_memory
                            else evaluate_batches(net, eval_data, cross_entropy, device=device))
                    record.update(test_acc=test["acc"], test_loss=test["loss"])
                records.append(record)
        finally:
            self.model.requires_grad_(True)  # frozen only while a later block trains
            self.model.train()
        return records


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 l2: float = 1e-4, tol: float = 1e-4, max_iter: int = 1000) -> dict[str, float]:
    """Multinomial logistic regression fitted to convergence: L-BFGS (strong Wolfe) in float64 on the
    standardised features, minimising mean cross-entropy + (l2/2)|W|^2, until the gradient's max-norm is
    below ``tol``. Returns the held-out accuracy, the final gradient norm and whether it converged.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 2, generator=g)
        >>> y = (x[:, 0] > 0).long()                       # linearly separable
        >>> res = linear_probe(x[:100], y[:100], x[100:], y[100:], num_classes=2)
        >>> res["acc"] > 0.95, res["converged"]
        (True, True)
    """
    x = train_x.flatten(1).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    xt = (test_x.flatten(1).double() - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    y = train_y.to(torch.long)

    def objective() -> Tensor:
        return torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()

    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        grads = torch.autograd.grad(objective(), [w, b])
    grad_norm = float(max(g.abs().max() for g in grads))
    with torch.no_grad():
        acc = float(((xt @ w + b).argmax(1) == test_y.to(xt.device)).double().mean())
    return {"acc": acc, "grad_norm": grad_norm, "converged": grad_norm <= tol}


def probe(model: LayerwiseCNN, depth: int, data: Data, config: TrainConfig, p: int = 0,
          width: int | None = None) -> float:
    """Test accuracy of a classifier trained on the frozen features after ``depth`` blocks: p = 0 is the
    linear separability probe (logistic regression on 2x2-averaged features, fitted to convergence by
    :func:`linear_probe`; ``config`` is not used), p > 0 the 'CNN-p' probe trained with ``config``.

    Example:
        Features after a random first block still separate the digits well; the probe fits a logistic regression on
        them to convergence:

        >>> from backproplab.data import load_dataset
        >>> data = load_dataset("digits")
        >>> net = LayerwiseCNN(data.input_shape, 10, widths=(16, 16), downsample=(1,))
        >>> probe(net, 1, data, None) > 0.8
        True
    """
    trunk = nn.Sequential(*model.blocks[:depth])
    feats = replace(data, x_train=_features(trunk, data.x_train), x_test=_features(trunk, data.x_test))
    if p == 0:
        avg = _nd(model.dims)[2](2)
        result = linear_probe(avg(feats.x_train), feats.y_train, avg(feats.x_test), feats.y_test, data.num_classes)
        if not result["converged"]:
            raise RuntimeError(f"linear probe at depth {depth} did not converge (gradient {result['grad_norm']:.2e})")
        return result["acc"]
    seed_everything(config.seed)
    head = AuxClassifier(feats.input_shape[0], data.num_classes, p + 1, model.dims, width)
    history = fit(head, feats, config)
    return history[-1]["test_acc"]


def retrain_smaller_classifier(model: LayerwiseCNN, data: Data, config: TrainConfig, width: int) -> tuple[float, int]:
    """The paper's size reduction: a narrower final classifier (k convs of ``width``) on the frozen trunk.
    Returns (test accuracy, parameters of the new classifier).

    Example:
        >>> from backproplab.data import load_dataset
        >>> from backproplab.train import TrainConfig
        >>> data = load_dataset("digits", n_train=200)
        >>> net = LayerwiseCNN(data.input_shape, 10, widths=(8, 16), downsample=(1,), k=2)
        >>> acc, params = retrain_smaller_classifier(net, data, TrainConfig(epochs=1), width=4)
        >>> 0 <= acc <= 1, params == sum(p.numel() for p in AuxClassifier(16, 10, 2, 2, 4).parameters())
        (True, True)
        >>> params < sum(p.numel() for p in net.aux[-1].parameters())                # narrower than the trained one
        True
    """
    trunk = nn.Sequential(*model.blocks)
    feats = replace(data, x_train=_features(trunk, data.x_train), x_test=_features(trunk, data.x_test))
    seed_everything(config.seed)
    head = AuxClassifier(feats.input_shape[0], data.num_classes, model.k, model.dims, width)
    history = fit(head, feats, config)
    return history[-1]["test_acc"], sum(p.numel() for p in head.parameters())


def parameter_count(module: nn.Module) -> int:
    """The number of trainable and frozen parameters of ``module``.

    Example:
        >>> from torch import nn
        >>> parameter_count(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in module.parameters())



"""Luck Matters: the teacher-student framework for deep ReLU networks and node specialization.

Tian, Jiang, Gong, Morcos, "Luck Matters: Understanding Training Dynamics of Deep ReLU Networks"
(arXiv 1905.13405), and Tian, "Student Specialization in Deep ReLU Networks With Finite Width and Input
Dimension" (ICML 2020). A fixed multi-layer ReLU teacher labels Gaussian inputs; an over-parameterised
student of the same depth is trained on the teacher's outputs (MSE), and student nodes are matched to
teacher nodes by the Pearson correlation of their activations on held-out inputs.

Teachers (:func:`make_teacher`), as the authors' code builds them (luckmatters, ``model_gen.py`` and
``teacher_tune.py``):
  ``"2019"``: weights drawn from {+-0.5, +-0.25, 0} with distinct rows, biases U(-0.5, 0.5); then each row
  and its bias are divided by the row's norm (:func:`normalize_rows`, the authors' ``normalize_layer``), so
  every node computes the same half-space as before, with unit weights.
  ``"2020"``: the same grid, then hidden node j's outgoing weights are divided by (j + 1)^``strength_decay``
  (strong nodes first, weak nodes last), then the rows are normalised, then every hidden bias is shifted
  by the median pre-activation on Gaussian inputs so each node is active on about half of them, and
  finally the outputs are standardised (mean 0, standard deviation 1 each on those inputs).
  ``"random"``: Gaussian weights N(0, 1/fan_in) and no structure (the 'random data' contrast).

Metrics (any two MLPs whose activations are ``nn.ReLU`` modules): :func:`layer_correlations`,
:func:`match_table`, :func:`luck_ranks`, :func:`fan_out_norms`, :func:`fan_out_ratio`; pruning to the lucky nodes:
:func:`prune_to_nodes`; BatchNorm biases: :func:`bn_bias_fractions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data import Data
from ..streams import derive, derive_seed


class ReLUNet(nn.Sequential):
    """Linear -> [BatchNorm1d] -> ReLU per hidden layer, then a linear output layer.

    Example:
        >>> import torch
        >>> net = ReLUNet(5, (4, 3), 2, batchnorm=True)
        >>> tuple(net(torch.randn(6, 5)).shape), sum(isinstance(m, nn.BatchNorm1d) for m in net)
        ((6, 2), 2)
    """

    def __init__(self, input_dim: int, widths: Sequence[int], output_dim: int, batchnorm: bool = False):
        layers: list[nn.Module] = []
        d = input_dim
        for w in widths:
            layers.append(nn.Linear(d, w))
            if batchnorm:
                layers.append(nn.BatchNorm1d(w))
            layers.append(nn.ReLU())
            d = w
        layers.append(nn.Linear(d, output_dim))
        super().__init__(*layers)
        self.widths = tuple(widths)

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]


def _structured_rows(rows: int, cols: int, g: torch.Generator) -> Tensor:
    """Distinct, non-zero rows with entries from the grid {+-0.5, +-0.25, 0}."""
    values = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5])
    seen, out = set(), []
    while len(out) < rows:
        row = values[torch.randint(0, 5, (cols,), generator=g)]
        key = tuple(row.tolist())
        if key in seen or not row.any():
            continue
        seen.add(key)
        out.append(row)
    return torch.stack(out)


@torch.no_grad()
def normalize_rows(linear: nn.Linear) -> nn.Linear:
    """Divide each row of the weight and its bias by the row's norm (in place): the node's half-space
    {x : w.x + b > 0} is unchanged and its weights have unit length.

    Example:
        >>> import torch
        >>> layer = nn.Linear(3, 2)
        >>> x = torch.randn(100, 3)
        >>> fires = layer(x) > 0
        >>> torch.allclose(normalize_rows(layer).weight.norm(dim=1), torch.ones(2)), torch.equal(layer(x) > 0, fires)
        (True, True)
    """
    norm = linear.weight.norm(dim=1)
    linear.weight.div_(norm[:, None])
    if linear.bias is not None:
        linear.bias.div_(norm)
    return linear


@torch.no_grad()
def make_teacher(input_dim: int = 20, widths: Sequence[int] = (10, 15, 20, 25), output_dim: int = 100,
                 version: str = "2019", seed: int = 0, input_std: float = 10.0, strength_decay: float = 1.0,
                 calibration: int = 20000) -> ReLUNet:
    """A fixed teacher network (see the module docstring for the versions).

    Example:
        >>> teacher = make_teacher(input_dim=5, widths=(4, 3), output_dim=2, seed=0)
        >>> data = teacher_data(teacher, n_train=64, n_test=16)
        >>> tuple(data.x_train.shape), tuple(data.y_train.shape)
        ((64, 5), (64, 2))

    References:
        Tian, Jiang, Gong and Morcos, "Luck matters: Understanding training dynamics of deep ReLU networks",
        arXiv:1905.13405, 2019.
    """
    if version not in ("2019", "2020", "random"):
        raise ValueError(f"teacher version must be '2019', '2020' or 'random', got {version!r}")
    g = derive(seed, "teacher")
    teacher = ReLUNet(input_dim, widths, output_dim)
    for lin in teacher.linears:
        if version == "random":
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
        else:
            lin.weight.copy_(_structured_rows(lin.out_features, lin.in_features, g))
        lin.bias.copy_(torch.rand(lin.bias.shape, generator=g) - 0.5)
    if version == "2020":
        for lin in teacher.linears[1:]:
            lin.weight.div_((torch.arange(lin.in_features) + 1.0)[None, :] ** strength_decay)
    if version != "random":
        for lin in teacher.linears:
            normalize_rows(lin)
    if version == "2020":
        x = torch.randn(calibration, input_dim, generator=g) * input_std
        for lin in teacher.linears[:-1]:
            lin.bias.sub_(lin(x).median(0).values)
            x = torch.relu(lin(x))
        out = teacher.linears[-1]
        y = out(x)
        mean, std = y.mean(0), y.std(0)
        out.weight.div_(std[:, None])
        out.bias.sub_(mean).div_(std)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def set_firing_rate(teacher: ReLUNet, rate: float, input_std: float = 10.0, calibration: int = 20000,
                    seed: int = 0) -> ReLUNet:
    """Shift each hidden node's bias so it fires (pre-activation > 0) on a fraction ``rate`` of the teacher's
    inputs N(0, input_std^2 I), layer by layer: the bias minus the node's (1 - rate) quantile of its
    pre-activation. A sparsely firing teacher is the premise of the paper's BatchNorm-bias argument (nodes
    that fire together rarely); the structured teachers fire half the time.

    Example:
        >>> teacher = set_firing_rate(make_teacher(input_dim=5, widths=(8,), output_dim=2, seed=0), 0.2)
        >>> rate = coactivation(teacher, 10 * torch.randn(20_000, 5, generator=torch.Generator().manual_seed(1)))
        >>> abs(rate[0]["firing_rate"] - 0.2) < 0.02
        True
    """
    if not 0 < rate < 1:
        raise ValueError(f"firing rate {rate!r}: use a fraction in (0, 1)")
    g = derive(seed, "firing-rate-calibration")
    x = torch.randn(calibration, teacher.linears[0].in_features, generator=g) * input_std
    for lin in teacher.linears[:-1]:
        pre = lin(x)
        lin.bias.sub_(pre.quantile(1 - rate, dim=0))
        x = torch.relu(lin(x))
    return teacher


@torch.no_grad()
def coactivation(model: nn.Module, x: Tensor) -> list[dict[str, float]]:
    """Per hidden layer: the mean firing rate P(i) and the co-activation ratio, the mean over node pairs i != j of
    P(j fires | i fires). Under independence the ratio equals the firing rate; the paper's premise is nodes that
    rarely fire together, a ratio well below 1 and a firing rate well below 1/2.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(1, 2)
        >>> with torch.no_grad():                          # node 0 fires when x > 0, node 1 when x < 0: never together
        ...     _ = layer.weight.copy_(torch.tensor([[1.0], [-1.0]])); _ = layer.bias.zero_()
        >>> model = nn.Sequential(layer, nn.ReLU(), nn.Linear(2, 1))
        >>> stats = coactivation(model, torch.randn(10_000, 1, generator=torch.Generator().manual_seed(0)))
        >>> abs(stats[0]["firing_rate"] - 0.5) < 0.02, stats[0]["coactivation_ratio"]
        (True, 0.0)

    References:
        Tian, Jiang, Gong and Morcos, "Luck matters: Understanding training dynamics of deep ReLU networks",
        arXiv:1905.13405, 2019.
    """
    out = []
    for h in hidden_activations(model, x):
        fires = (h > 0).double()
        rate = fires.mean(0)
        joint = fires.T @ fires / len(fires)
        k = len(rate)
        conditional = joint / rate.clamp_min(1e-12)[:, None]
        off = ~torch.eye(k, dtype=torch.bool)
        out.append({"firing_rate": float(rate.mean()), "coactivation_ratio": float(conditional[off].mean())})
    return out


def teacher_data(teacher: nn.Module, n_train: int = 100_000, n_test: int = 10_000, input_std: float = 10.0,
                 seed: int = 0) -> Data:
    """Gaussian inputs N(0, input_std^2 I) labelled by ``teacher`` (regression targets).

    Example:
        >>> import torch
        >>> teacher = make_teacher(input_dim=3, widths=(4,), output_dim=2, seed=0)
        >>> data = teacher_data(teacher, n_train=50, n_test=10, input_std=2.0, seed=1)
        >>> tuple(data.x_train.shape), tuple(data.y_test.shape)
        ((50, 3), (10, 2))
        >>> torch.allclose(teacher(data.x_train), data.y_train)        # the targets are the teacher's outputs
        True
    """
    g = derive(seed, "teacher-data")  # not the teacher's own stream (seed + 1 was seed k + 1's teacher)
    input_dim = next(m for m in teacher.modules() if isinstance(m, nn.Linear)).in_features
    x = torch.randn(n_train + n_test, input_dim, generator=g) * input_std
    with torch.no_grad():
        y = teacher(x)
    return Data("gaussian_teacher", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 0)


def gaussian_teacher(seed: int = 0, root=None, version: str = "2019", input_dim: int = 20,
                     widths: tuple[int, ...] = (10, 15, 20, 25), output_dim: int = 100, train_size: int = 100_000,
                     test_size: int = 10_000, input_std: float = 10.0) -> Data:
    """The Luck Matters teacher's data: the foundation's ``gaussian_teacher`` dataset.

    Example:
        >>> data = gaussian_teacher(seed=0, input_dim=4, widths=(6,), output_dim=3, train_size=50, test_size=10)
        >>> teacher = make_teacher(4, (6,), 3, "2019", 0, 10.0)               # the same teacher, rebuilt
        >>> data.x_train.shape, data.y_train.shape, torch.allclose(teacher(data.x_train), data.y_train)
        (torch.Size([50, 4]), torch.Size([50, 3]), True)
    """
    teacher = make_teacher(input_dim, widths, output_dim, version, seed, input_std)
    return teacher_data(teacher, train_size, test_size, input_std, seed)


# ---------------------------------------------------------------- activations and correlations


@torch.no_grad()
def hidden_activations(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Post-ReLU activations of every ``nn.ReLU`` module, in forward order, as (n, width) tensors.

    Example:
        >>> import torch
        >>> acts = hidden_activations(ReLUNet(5, (4, 3), 2), torch.randn(6, 5))
        >>> [tuple(a.shape) for a in acts], all(bool((a >= 0).all()) for a in acts)
        ([(6, 4), (6, 3)], True)
    """
    outs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().flatten(1)))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return outs


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation between every column of a (n, p) and of b (n, q): a (p, q) matrix.
    A constant (dead) node has correlation 0 with everything.

    Example:
        >>> import torch
        >>> a = torch.randn(100, 2)
        >>> c = correlation(a, torch.stack([2 * a[:, 0] + 1, -a[:, 1], torch.ones(100)], 1))
        >>> [[round(v, 4) for v in row] for row in c.tolist()][0][:1], round(c[1, 1].item(), 4), c[0, 2].item()
        ([1.0], -1.0, 0.0)
    """
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    c = (a.T @ b) / (na[:, None] * nb[None, :])
    return torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0)


def layer_correlations(teacher: nn.Module, student: nn.Module, x: Tensor) -> list[Tensor]:
    """Per hidden layer, the (teacher nodes x student nodes) correlation matrix on inputs ``x``.

    Example:
        >>> import torch
        >>> teacher = make_teacher(input_dim=5, widths=(4,), output_dim=2, seed=0)
        >>> twin = duplicated_student(teacher, copies=2)          # every teacher node twice: correlation 1 each
        >>> corr, = layer_correlations(teacher, twin, 10 * torch.randn(500, 5))
        >>> tuple(corr.shape), bool(((corr > 0.999).sum(1) == 2).all())
        ((4, 8), True)

    References:
        Tian et al., arXiv:1905.13405, Section 5.
    """
    ta, sa = hidden_activations(teacher, x), hidden_activations(student, x)
    if len(ta) != len(sa):
        raise ValueError(f"teacher has {len(ta)} ReLU layers, student {len(sa)}: they must have the same depth")
    return [correlation(t, s) for t, s in zip(ta, sa)]


def match_table(corr: Tensor, hit: float = 0.9, covered: float = 0.95) -> dict:
    """For one layer: best correlation per teacher node, its student, their mean ('normalized
    correlation'), the number of students with correlation >= ``hit`` per teacher node, and the
    fraction of teacher nodes whose best student reaches ``covered``.

    Example:
        >>> import torch
        >>> corr = torch.tensor([[0.99, 0.2], [0.1, 0.5], [0.97, 0.3]])    # 3 students x 2 teacher nodes
        >>> table = match_table(corr.T)
        >>> table["best_student"].tolist(), table["hits"].tolist(), table["covered"]
        ([0, 1], [2, 0], 0.5)

    References:
        Tian et al., arXiv:1905.13405, Section 5 (normalized correlation).
    """
    best, idx = corr.max(1)
    return {"best": best, "best_student": idx, "mean_best": float(best.mean()),
            "hits": (corr >= hit).sum(1), "covered": float((best >= covered).double().mean())}


def luck_ranks(corr_init: Tensor, corr_final: Tensor) -> Tensor:
    """For each teacher node: the rank, by correlation at initialisation (0 = most correlated), of the
    student that ends up best matched to it.

    Example:
        >>> import torch
        >>> init = torch.tensor([[0.9, 0.1], [0.2, 0.3]])      # teacher nodes x students, at initialisation
        >>> final = torch.tensor([[0.99, 0.2], [0.1, 0.95]])    # at the end
        >>> luck_ranks(init, final).tolist()                     # each winner was the best-correlated at init
        [0, 0]

    References:
        Tian et al., arXiv:1905.13405, Section 5 (lucky nodes).
    """
    final_best = corr_final.argmax(1)
    order = corr_init.argsort(1, descending=True)
    return (order == final_best[:, None]).double().argmax(1)


def fan_out_norms(model: nn.Module) -> list[Tensor]:
    """Per hidden layer, the norm of each node's outgoing weights (columns of the next Linear).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> torch.allclose(fan_out_norms(model)[0], model[2].weight.norm(dim=0))   # node j: column j of the next layer
        True
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [nxt.weight.detach().norm(dim=0) for nxt in linears[1:]]


def fan_out_ratio(best_corr: Tensor, fan_out: Tensor, fan_out_init: Tensor | None = None, unmatched: float = 0.5,
                  matched: float = 0.9) -> float:
    """Within one layer: the mean fan-out of the unmatched student nodes (best correlation with any
    teacher node < ``unmatched``) over that of the matched ones (>= ``matched``); each node's fan-out taken
    relative to its own value at initialisation when ``fan_out_init`` is given. Below 1 is the paper's
    L-shape. NaN when either group is empty. Pooling layers would mix their different initial scales.

    Example:
        >>> import torch
        >>> best = torch.tensor([0.95, 0.92, 0.1, 0.2])      # two matched nodes, two unmatched
        >>> fan_out_ratio(best, torch.tensor([2.0, 2.0, 0.5, 0.5]))
        0.25

    References:
        Tian et al., arXiv:1905.13405, 2019 (the L-shape: unmatched nodes' fan-out shrinks).
    """
    value = fan_out / fan_out_init if fan_out_init is not None else fan_out
    lo, hi = value[best_corr < unmatched], value[best_corr >= matched]
    return float(lo.mean() / hi.mean()) if len(lo) and len(hi) else float("nan")


@torch.no_grad()
def prune_to_nodes(student: ReLUNet, keep: Sequence[Tensor], reinit: bool = False, seed: int = 0) -> ReLUNet:
    """A narrower ReLUNet with only the hidden nodes ``keep[l]`` of each layer: their trained weights
    (``reinit=False``, pruning) or a fresh initialisation of the same shape (``reinit=True``, the
    re-initialised 'lottery ticket').

    Example:
        >>> import torch
        >>> student = ReLUNet(5, (4, 3), 2)
        >>> small = prune_to_nodes(student, [torch.tensor([0, 2]), torch.tensor([1])])
        >>> [m.out_features for m in small if isinstance(m, nn.Linear)]
        [2, 1, 2]

    References:
        Tian et al., arXiv:1905.13405, Section 5 (pruning to the lucky nodes).
    """
    widths = [len(k) for k in keep]
    lin = student.linears
    bn = any(isinstance(m, nn.BatchNorm1d) for m in student)
    with torch.random.fork_rng(devices=[]):  # the caller's global stream is left as it was
        torch.manual_seed(derive_seed(seed, "pruned-student"))
        small = ReLUNet(lin[0].in_features, widths, lin[-1].out_features, batchnorm=bn)
    if reinit:
        return small
    rows_prev = torch.arange(lin[0].in_features)
    for i, (src, dst) in enumerate(zip(lin, small.linears)):
        rows = keep[i] if i < len(keep) else torch.arange(src.out_features)
        dst.weight.copy_(src.weight[rows][:, rows_prev])
        dst.bias.copy_(src.bias[rows])
        rows_prev = rows
    if bn:
        for src, dst, k in zip([m for m in student if isinstance(m, nn.BatchNorm1d)],
                               [m for m in small if isinstance(m, nn.BatchNorm1d)], keep):
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst, name).copy_(getattr(src, name)[k])
    return small


# ---------------------------------------------------------------- BatchNorm biases


def bn_bias_fractions(model_or_state: nn.Module | dict) -> dict[str, float]:
    """Fraction of negative BatchNorm biases (beta) per BatchNorm layer, from a model or a state_dict
    (a layer is recognised in a state_dict by its ``running_mean`` buffer).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> bn = nn.BatchNorm1d(4)
        >>> with torch.no_grad():
        ...     _ = bn.bias.copy_(torch.tensor([-1.0, -0.5, 0.5, 1.0]))
        >>> bn_bias_fractions(nn.Sequential(bn))
        {'0': 0.5}

    References:
        Tian et al., arXiv:1905.13405, Section 6 (BatchNorm biases).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = {}
    for key in state:
        if key.endswith("running_mean"):
            prefix = key[: -len("running_mean")]
            bias = state.get(prefix + "bias")
            if bias is not None:
                out[prefix.rstrip(".")] = float((bias < 0).double().mean())
    return out


def duplicated_student(teacher: ReLUNet, copies: int = 2, seed: int = 0) -> ReLUNet:
    """An exact, wider copy of ``teacher``: every hidden node duplicated ``copies`` times, nodes permuted,
    outgoing weights split among the copies, so the function is unchanged (for tests and sanity checks).

    Example:
        >>> import torch
        >>> teacher = make_teacher(input_dim=5, widths=(4, 3), output_dim=2, seed=0)
        >>> x = torch.randn(10, 5)
        >>> torch.allclose(duplicated_student(teacher, copies=3)(x), teacher(x), atol=1e-5)
        True
    """
    g = derive(seed, "duplicated-student")
    lin = teacher.linears
    student = ReLUNet(lin[0].in_features, [w * copies for w in teacher.widths], lin[-1].out_features)
    perms = [torch.randperm(w * copies, generator=g) for w in teacher.widths]
    with torch.no_grad():
        src_prev = torch.arange(lin[0].in_features)
        scale_prev = torch.ones(lin[0].in_features)
        for i, (s, d) in enumerate(zip(lin, student.linears)):
            if i < len(perms):
                src = (perms[i] % teacher.widths[i])  # student node j copies teacher node src[j]
            else:
                src = torch.arange(s.out_features)
            d.weight.copy_(s.weight[src][:, src_prev] * scale_prev[None, :])
            d.bias.copy_(s.bias[src])
            src_prev = src
            scale_prev = torch.full((len(src),), 1.0 / copies)
    return student

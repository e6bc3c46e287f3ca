"""The ghost clipping engine against two independent references, in float64:

- a one-example-at-a-time loop (autograd on each example alone, norm, clip, sum): the clipped sum to 1e-10;
- torch.func per-example gradients of the whole model (vmap of grad): the per-example norms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from backproplab.methods import privacy
from backproplab.methods.ghost_clipping import GhostClipping
from backproplab.models import build_model

TOL = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True, scope="module")
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)



def loop_reference(model: nn.Module, loss_of, xs, y, clip: float):
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i, one example at a time, and the norms ||g_i||."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(y)):
        grads = torch.autograd.grad(loss_of(model, [x[i:i + 1] for x in xs], y[i:i + 1]), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return dict(zip(params, total)), torch.stack(norms)


def func_norms(model: nn.Module, loss_of, xs, y):
    """||g_i|| from torch.func: vmap over examples of grad of the model's functional form."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p, t, *x):
        return loss_of(lambda *a: functional_call(model, p, a), [xi.unsqueeze(0) for xi in x], t.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, *[0] * len(xs)))(params, y, *xs)
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))


def ce(model, xs, y):
    return F.cross_entropy(model(*xs), y, reduction="sum")


def engine(model: nn.Module, loss_of, xs, y, clip: float, into=None, alpha: float = 1.0, scale: float = 1.0):
    """The engine on ``loss_of`` (a sum over examples), divided by ``scale`` and passed with it (the DP-SGD
    step's mean loss: ``scale`` = batch size)."""
    clipper = GhostClipping(model)
    with clipper.recording():
        loss = loss_of(clipper, xs, y) / scale
    sums, norms = clipper.clipped_sum(loss, clip, into=into, alpha=alpha, scale=scale)
    clipper.remove_hooks()
    return sums, norms


def assert_engine_exact(model, xs, y, clip, loss_of=ce, check_func=True):
    """Both outputs of the engine against the loop: the clipped sums it returns, and (the DP-SGD step's
    path: a mean loss, its backward started from the batch size) base + alpha * clipped sum accumulated in
    place into given tensors."""
    model = model.double()
    xs = [x.double() if x.is_floating_point() else x for x in xs]
    sums, norms = engine(model, loss_of, xs, y, clip)
    ref_sums, ref_norms = loop_reference(model, loss_of, xs, y, clip)
    torch.testing.assert_close(norms, ref_norms, **TOL)
    names = {p: n for n, p in model.named_parameters()}
    for p, ref in ref_sums.items():
        torch.testing.assert_close(sums.get(p, torch.zeros_like(p)), ref, **TOL, msg=names[p])
    gen = torch.Generator().manual_seed(1)
    base = {p: torch.randn(p.shape, generator=gen) for p in ref_sums}
    into, _ = engine(model, loss_of, xs, y, clip, into={p: b.clone() for p, b in base.items()}, alpha=0.37,
                     scale=len(y))
    for p, ref in ref_sums.items():
        torch.testing.assert_close(into[p], base[p] + 0.37 * ref, **TOL, msg=f"{names[p]} (into)")
    if check_func:
        torch.testing.assert_close(norms, func_norms(model, loss_of, xs, y), **TOL)
    return norms


class Custom(nn.Module):
    """No rule of its own: a scale and shift per feature, through torch.func."""

    def __init__(self, d: int):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.scale + self.shift)


class Sequence(nn.Module):
    """Embedding -> LayerNorm -> Linear over positions -> mean -> Linear: every sequence rule at once."""

    def __init__(self, vocab: int, d: int, k: int, padding_idx: int | None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.norm, self.mix, self.out = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, k)

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.norm(self.emb(ids)))).mean(1))


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _y(n, k, seed=1):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ every supported layer, property tests

@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 6), i=st.integers(1, 7), o=st.integers(2, 5), t=st.integers(0, 4), bias=st.booleans(),
       clip=st.sampled_from([1e-3, 0.3, 1e6]))
@pytest.mark.medium
def test_linear(b, i, o, t, bias, clip):
    torch.manual_seed(b * 100 + i)
    model = nn.Sequential(nn.Linear(i, 6, bias=bias), nn.Tanh(), nn.Linear(6, o))
    x = _x(b, i) if t == 0 else _x(b, t, i)  # t > 0: positions, mean-pooled (ghost and materialised paths)
    if t == 0:
        assert_engine_exact(model, [x], _y(b, o), clip)
    else:
        def loss_of(m, xs, y):
            return F.cross_entropy(m(xs[0]).mean(1), y, reduction="sum")
        assert_engine_exact(model, [x], _y(b, o), clip, loss_of)


@settings(max_examples=24, deadline=None)
@given(b=st.integers(1, 5), c=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 1), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), bias=st.booleans(),
       one_d=st.booleans(), side=st.integers(6, 9), path=st.sampled_from(["cheaper", "ghost", "materialise"]),
       maps=st.booleans())
@example(b=3, c=2, k=3, stride=1, padding=1, dilation=2, groups=2, bias=True, one_d=False, side=8, path="ghost",
         maps=False)
@example(b=2, c=1, k=2, stride=1, padding=0, dilation=2, groups=1, bias=False, one_d=True, side=7, path="ghost",
         maps=True)
@example(b=3, c=2, k=1, stride=2, padding=0, dilation=1, groups=1, bias=True, one_d=False, side=7, path="ghost",
         maps=False)
@example(b=2, c=2, k=3, stride=2, padding=1, dilation=1, groups=2, bias=True, one_d=False, side=9,
         path="materialise", maps=False)
@pytest.mark.medium
def test_conv(b, c, k, stride, padding, dilation, groups, bias, one_d, side, path, maps):
    """Every shape on every path: the one the flop count picks (dW_i for layers this small), and each forced;
    with the position maps where they apply (layers this small), and without (the paths of larger layers)."""
    from unittest import mock

    from backproplab.methods import ghost_clipping

    torch.manual_seed(side)
    conv = nn.Conv1d if one_d else nn.Conv2d
    c_in, c_out = c * groups, 2 * groups
    model = nn.Sequential(conv(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                               bias=bias), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = _x(b, c_in, side) if one_d else _x(b, c_in, side, side - 1)
    model(x)  # materialise the lazy layer
    cheaper = ghost_clipping._materialise_cheaper if path == "cheaper" else lambda *a: path == "materialise"
    limits = {k: getattr(ghost_clipping, k) if maps else 0 for k in ("GRAM_MAP_LIMIT", "UNFOLD_MAP_LIMIT")}
    with mock.patch.object(ghost_clipping, "_materialise_cheaper", cheaper), \
            mock.patch.multiple(ghost_clipping, **limits):
        assert_engine_exact(model, [x], _y(b, 3), 0.5)


def test_one_decorated_function_gives_a_new_layer_type_its_own_rule():
    """Registering a rule for ``Custom`` (tanh(x * scale + shift): per-example gradients formed directly,
    dscale_i = sum over positions of x * delta, dshift_i = sum of delta, delta = g * (1 - y^2)) routes the layer
    to it instead of torch.func, exactly (against the per-example loop); a wrong rule (the tanh's derivative
    dropped) is refused by the first step's check against autograd."""
    from backproplab.methods import ghost_clipping
    from backproplab.methods.ghost_clipping import GHOST_RULES, register_ghost_rule

    built = []

    class CustomRule(ghost_clipping._Rule):
        def __init__(self, m, pairs, derivative=True):
            built.append(m)
            scale = shift = 0
            for call, g in pairs:
                x = call.args[0]
                delta = g * (1 - torch.tanh(x * m.scale + m.shift) ** 2) if derivative else g
                scale, shift = scale + (x * delta).reshape(len(x), -1, x.shape[-1]).sum(1), \
                    shift + delta.reshape(len(x), -1, x.shape[-1]).sum(1)
            self.per = [scale, shift]
            self.norms = [t.norm(dim=1) for t in self.per]

        def weighted(self, c):
            return [c @ t for t in self.per]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Custom(6), nn.Linear(6, 3))
    try:
        register_ghost_rule(Custom)(lambda m, pairs, owned: CustomRule(m, pairs))
        assert_engine_exact(model, [_x(7, 5)], _y(7, 3), 0.25)
        assert built and all(m is model[1] for m in built)  # the registered rule ran, not torch.func
        register_ghost_rule(Custom)(lambda m, pairs, owned: CustomRule(m, pairs, derivative=False))
        clipper = GhostClipping(model)
        with clipper.recording():
            loss = ce(clipper, [_x(7, 5)], _y(7, 3))
        with pytest.raises(RuntimeError, match="do not add up to its batch gradient"):
            clipper.clipped_sum(loss, 1.0)
    finally:
        GHOST_RULES.pop(Custom, None)


def test_conv_padding_modes_go_to_torch_func():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(3, 3, 2, padding="same"), nn.Flatten(), nn.Linear(3 * 36, 4))
    assert_engine_exact(model, [_x(4, 2, 6, 6)], _y(4, 4), 0.2)


@pytest.mark.medium
@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 6), vocab=st.integers(2, 9), padding=st.booleans())
def test_embedding_layernorm(b, t, vocab, padding):
    torch.manual_seed(vocab)
    model = Sequence(vocab, 4, 3, padding_idx=0 if padding else None)
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(t))  # repeated ids included
    assert_engine_exact(model, [ids], _y(b, 3), 0.1)


@pytest.mark.medium
@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 5), groups=st.sampled_from([1, 2, 4]), side=st.integers(2, 4), affine=st.booleans())
def test_groupnorm_and_layernorm_on_images(b, groups, side, affine):
    torch.manual_seed(side)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.GroupNorm(groups, 4, eps=0.1, affine=affine), nn.ReLU(),
                          nn.LayerNorm([4, side, side], eps=0.01), nn.Flatten(), nn.Linear(4 * side * side, 3))
    assert_engine_exact(model, [_x(b, 1, side, side)], _y(b, 3), 0.3)


def test_layernorm_without_positions_and_a_layer_without_a_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), Custom(6), nn.Linear(6, 3))
    assert_engine_exact(model, [_x(7, 5)], _y(7, 3), 0.25)


@pytest.mark.parametrize("path", ["cheaper", "ghost", "materialise", "offsets"])
def test_a_layer_called_several_times_sums_its_calls_exactly(path, monkeypatch):
    """Clean and two perturbed inputs through the same layers, clipped together as one example's gradient."""
    from backproplab.methods import ghost_clipping

    if path == "offsets":
        monkeypatch.setattr(ghost_clipping, "STACK_LIMIT", 0)
    elif path != "cheaper":
        monkeypatch.setattr(ghost_clipping, "_materialise_cheaper", lambda *a: path == "materialise")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), Custom(27),
                          nn.Linear(27, 4))

    def loss_of(m, xs, y):  # xs[1]: a per-example perturbation
        return (F.cross_entropy(m(xs[0]), y, reduction="sum") + F.cross_entropy(m(xs[0] + xs[1]), y, reduction="sum")
                + F.cross_entropy(m(xs[0] - xs[1]), y, reduction="sum")) / 3

    assert_engine_exact(model, [_x(6, 1, 5, 5), _x(6, 1, 5, 5, seed=9)], _y(6, 4), 0.1, loss_of)


# ------------------------------------------------------------------ whole models

@pytest.mark.parametrize("name, shape, kwargs", [
    ("mlp", (64,), {"widths": (32, 32)}),
    ("cnn", (1, 8, 8), {"channels": (4, 8), "hidden": 16, "batchnorm": True}),
    ("resnet18", (3, 8, 8), {"width": 0.125}),
])
@pytest.mark.medium
@pytest.mark.parametrize("path", ["cheaper", "ghost", "materialise", "offsets"])
def test_whole_models_with_groupnorm(name, shape, kwargs, path, monkeypatch):
    """Every path: the one the flop count picks per layer; each forced everywhere (Gram or dW_i); and the
    convolutions read offset by offset, as large layers are."""
    from backproplab.methods import ghost_clipping

    if path == "offsets":
        monkeypatch.setattr(ghost_clipping, "STACK_LIMIT", 0)
    elif path != "cheaper":
        monkeypatch.setattr(ghost_clipping, "_materialise_cheaper", lambda *a: path == "materialise")
    torch.manual_seed(0)
    model = privacy.prepare_model(build_model(name, shape, 10, **kwargs), quiet=True)
    if name != "mlp":
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    norms = assert_engine_exact(model.train(), [_x(5, *shape)], _y(5, 10), 1.0)
    assert (norms > 1.0).any()  # some examples are clipped: the factor matters


def test_two_layers_whose_outputs_are_added_share_an_output_gradient_and_both_stay_exact():
    """y = A(x) + B(h): autograd hands A and B one and the same output-gradient tensor, so neither layer's
    clipped sum may scale it in place; a lone layer's (C's) may."""
    from backproplab.methods import ghost_clipping

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.h, self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 3), nn.Linear(6, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.c(torch.tanh(self.a(x) + self.b(torch.relu(self.h(x)))))

    torch.manual_seed(0)
    model = Branches().double()
    clipper = GhostClipping(model)
    with clipper.recording():
        loss = ce(clipper, [_x(5, 4)], _y(5, 2))
    owned = {m: r.owned for m, r in clipper._rules(loss, retain_graph=False)
             if isinstance(r, ghost_clipping._LinearRule)}
    assert owned == {model.h: True, model.a: False, model.b: False, model.c: True}
    assert_engine_exact(Branches(), [_x(5, 4)], _y(5, 2), 0.05)


def test_two_groupnorms_whose_outputs_are_added_share_an_output_gradient_and_both_stay_exact():
    """The same for GroupNorm, whose rule multiplies its output gradient by its input in place when the
    gradient is its own: a residual block's two normalised branches get one gradient tensor."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.n1, self.n2 = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)
            self.n3, self.head = nn.GroupNorm(2, 4), nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            h = torch.relu(self.n1(self.conv(x)) + self.n2(x))  # n1 and n2 share their output gradient
            return self.head(torch.tanh(self.n3(h)).flatten(1))  # n3's is its own

    torch.manual_seed(0)
    assert_engine_exact(Residual(), [_x(6, 4, 5, 5)], _y(6, 3), 0.05)


def test_inplace_activation_after_a_layer_is_handled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    assert_engine_exact(model, [_x(6, 4)], _y(6, 3), 0.2)


def test_a_parameter_used_outside_its_module_is_an_error():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(self.a(x), self.a.weight)  # a.weight used twice, once outside a's forward

    with pytest.raises(RuntimeError, match="do not add up"):
        engine(Tied().double(), ce, [_x(3, 4)], _y(3, 4), 1.0)


def test_no_recorded_forward_is_an_error():
    clipper = GhostClipping(nn.Linear(2, 2))
    with torch.no_grad(), clipper.recording():
        clipper(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="no recorded forward"):
        clipper.clipped_sum(torch.zeros((), requires_grad=True), 1.0)

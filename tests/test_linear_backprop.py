"""Linear backprop against hand-built references in float64."""

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from backproplab.methods.linear_backprop import (KNOWN_ACTIVATIONS, LinearBackward, linear_backprop,
                                                 linear_backprop_scope, standard_backprop)
from backproplab.models import Sign, build_model
from backproplab.streams import derive_seed

ACTS = [cls() for cls in KNOWN_ACTIVATIONS]


@pytest.mark.parametrize("cls", KNOWN_ACTIVATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_is_bit_identical(cls, dtype):
    """Every forward path (no grad, reverse mode, forward_ad, torch.func) gives the activation's bits."""
    x = (torch.randn(257, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x[:2] = torch.tensor([-0.0, 0.0])
    expected = cls()(x)
    switched = linear_backprop(nn.Sequential(cls()))
    assert isinstance(switched[0], LinearBackward) and isinstance(switched[0], cls)

    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]

    def same(y):
        return torch.equal(y.view(bits), expected.view(bits))

    with torch.no_grad():
        assert same(switched(x))
    assert same(switched(x.clone().requires_grad_()).detach())
    if dtype in (torch.float32, torch.float64):
        with fwAD.dual_level():
            assert same(fwAD.unpack_dual(switched(fwAD.make_dual(x, torch.ones_like(x)))).primal)
        assert same(jvp(switched, (x,), (torch.ones_like(x),))[0])
        assert same(vmap(switched)(x[None])[0])


def test_forward_hooks_on_the_activation_still_run():
    act = nn.Tanh()
    seen = []
    act.register_forward_hook(lambda m, inp, out: seen.append(out.detach().clone()))
    act.register_forward_hook(lambda m, inp, out: out * 2)
    model = linear_backprop(nn.Sequential(nn.Linear(3, 3), act))
    x = torch.randn(4, 3, requires_grad=True)
    y = model(x)
    assert len(seen) == 1 and torch.equal(y, 2 * seen[0])
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 2 * model[0].weight.sum(0).expand(4, 3))


def test_switched_model_pickles_and_restores(tmp_path):
    model = linear_backprop(build_model("mlp", (5,), 2, widths=(6,), activation="elu"))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert sum(isinstance(m, LinearBackward) for m in loaded.modules()) == 1
    x = torch.randn(3, 5)
    assert torch.equal(loaded(x), model(x))
    assert [type(m) for m in standard_backprop(loaded).modules() if isinstance(m, nn.ELU)] == [nn.ELU]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__)
def test_activation_derivative_is_one(act):
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, dtype=torch.float64)
    (dx,) = torch.autograd.grad(linear_backprop(nn.Sequential(act))(x), x, g)
    assert torch.equal(dx, g)


def _mlp_reference_grads(model, x, y):
    """Same MLP by hand: h = z + (f(z) - z).detach(), exact in float64, so f' = 1 in backward only."""
    h = x.flatten(1)
    layers = [m for m in model.body if isinstance(m, nn.Linear)]
    acts = [m for m in model.body if not isinstance(m, (nn.Linear, nn.Flatten))]
    params = []
    for lin, act in zip(layers, acts):
        w, b = lin.weight.detach().clone().requires_grad_(), lin.bias.detach().clone().requires_grad_()
        params += [w, b]
        z = h @ w.T + b
        h = z + (act(z) - z).detach()
    w, b = model.head.weight.detach().clone().requires_grad_(), model.head.bias.detach().clone().requires_grad_()
    params += [w, b]
    loss = F.cross_entropy(h @ w.T + b, y)
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu", "softplus", "elu"])
def test_mlp_gradients_match_hand_built_reference(activation):
    torch.manual_seed(0)
    model = build_model("mlp", (12,), 4, widths=(16, 8), activation=activation).double()
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 4, (10,))
    linear_backprop(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for g, r in zip(grads, _mlp_reference_grads(model, x, y)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_cnn_gradients_match_hand_built_reference():
    torch.manual_seed(1)
    model = build_model("cnn", (1, 8, 8), 3, channels=(4, 6), hidden=10, activation="tanh").double()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    linear_backprop(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    c1, c2 = model.features[0], model.features[3]
    l1, head = model.classifier[1], model.head
    params = [p.detach().clone().requires_grad_() for p in (c1.weight, c1.bias, c2.weight, c2.bias,
                                                            l1.weight, l1.bias, head.weight, head.bias)]

    def lin_tanh(z):
        return z + (torch.tanh(z) - z).detach()

    h = F.max_pool2d(lin_tanh(F.conv2d(x, params[0], params[1], padding=1)), 2)
    h = F.max_pool2d(lin_tanh(F.conv2d(h, params[2], params[3], padding=1)), 2)
    h = lin_tanh(F.linear(h.flatten(1), params[4], params[5]))
    reference = torch.autograd.grad(F.cross_entropy(F.linear(h, params[6], params[7]), y), params)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_restoring_gives_the_original_gradients_back():
    torch.manual_seed(2)
    model = build_model("mlp", (6,), 3, widths=(7,), activation="sigmoid").double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))

    def grads():
        return torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    original = grads()
    with linear_backprop_scope(model):
        linear = grads()
    restored = grads()
    assert not all(torch.equal(a, b) for a, b in zip(original, linear))
    assert all(torch.equal(a, b) for a, b in zip(original, restored))
    assert not any(isinstance(m, LinearBackward) for m in model.modules())
    assert list(model.state_dict()) == list(standard_backprop(model).state_dict())


def test_under_torch_func_vmap_and_jvp():
    """jvp w.r.t. the input equals the product of the weight matrices (the linearised network);
    vmap(grad) gives the per-example gradients of a Python loop."""
    torch.manual_seed(3)
    model = linear_backprop(build_model("mlp", (5,), 2, widths=(6, 4), activation="tanh").double())
    x, v = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    out, tangent = jvp(lambda inp: model(inp[None])[0], (x,), (v,))
    w = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    torch.testing.assert_close(tangent, w[2] @ w[1] @ w[0] @ v)
    torch.testing.assert_close(out, model(x[None])[0])

    params = {k: p.detach() for k, p in model.named_parameters()}
    xs, ys = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 2, (7,))

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(7):
        single = torch.autograd.grad(loss(dict(model.named_parameters()), xs[i], ys[i]), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), single):
            torch.testing.assert_close(batched[name][i], g)


def test_unknown_activation_is_reported_by_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.Mish(), nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"1 \(Mish\)"):
        linear_backprop(model)
    linear_backprop(model, ignore=(nn.Mish,))
    assert isinstance(model[1], nn.Mish) and isinstance(model[3], LinearBackward)
    other = nn.Sequential(nn.Mish())
    linear_backprop(other, activations=KNOWN_ACTIVATIONS + (nn.Mish,))
    assert isinstance(other[0], LinearBackward)


def test_sign_uses_the_clipped_straight_through_estimator():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], requires_grad=True)
    y = Sign()(x)
    assert torch.equal(y, torch.sign(x.detach()))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    (g,) = torch.autograd.grad(linear_backprop(nn.Sequential(Sign()))(x).sum(), x)
    assert g.tolist() == [1.0] * 5


@pytest.mark.medium
def test_runner_flag_switches_linear_backprop_on(tmp_path):
    from backproplab import experiments

    cfg = experiments.make_config(experiments.get("baselines"), ["linear_backprop=true"])
    run = experiments.Run(cfg, None, 0, tmp_path, tmp_path, True, "cpu")
    model = run.prepare_model(build_model("mlp", (4,), 2))
    assert sum(isinstance(m, LinearBackward) for m in model.modules()) == 2


def test_inplace_activation_modules_behave_like_their_out_of_place_twins():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    inplace = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    inplace.load_state_dict(plain.state_dict())
    linear_backprop(plain), linear_backprop(inplace)
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for fn in (lambda m: m(x), lambda m: jvp(m, (x,), (v,))[1], lambda m: vmap(m)(x),
               lambda m: torch.autograd.grad(m(x).sum(), list(m.parameters()))):
        a, b = fn(plain), fn(inplace)
        for u, w in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, w)


def _detach_reference_grads(model, x, y):
    """Linear backprop written with detach: h = z + (f(z) - z).detach() has the forward f(z), derivative 1."""
    h = x
    for m in model:
        h = m(h) if isinstance(m, nn.Linear) else h + (m(h) - h).detach()
    return torch.autograd.grad(F.cross_entropy(h, y), list(model.parameters()))


def test_the_readme_scope_example_gives_linear_backprop_gradients():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 2, (16,))
    reference = _detach_reference_grads(model, x, y)
    with linear_backprop_scope(model):  # the README's pattern: the forward runs inside the scope
        F.cross_entropy(model(x), y).backward()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)


def test_a_scope_around_the_backward_alone_raises():
    """The derivative is fixed when the forward is recorded: backward alone inside gives ordinary gradients."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    loss = F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="no forward pass ran inside the scope"):
        with linear_backprop_scope(model):
            loss.backward()
    assert not any(isinstance(m, LinearBackward) for m in model.modules())


@pytest.mark.parametrize("method", ["bp", "lbp"])
def test_five_point_fit_shares_the_points_and_equals_a_plain_loop(method):
    """Every initialisation of every seed fits the same 5 points; the vmapped training of all inits at
    once equals ordinary gradient descent of each init on its own (the library's MLP, switched for lbp)."""
    import dataclasses

    from backproplab.experiments.linear_backprop import LinearBackpropConfig, fit_five_points, five_points

    cfg = dataclasses.replace(LinearBackpropConfig(), n_inits=3, points_iters=15, points_widths=(8, 8))
    x, y = five_points()
    assert torch.equal(x, five_points()[0]) and x.shape == (5, 1)
    for seed in (0, 1):
        losses = fit_five_points(cfg, method, 0.3, seed)["losses"]
        for i in range(cfg.n_inits):
            torch.manual_seed(derive_seed(seed, "points-init", i))
            model = build_model("mlp", (1,), 1, widths=(8, 8), activation="sigmoid")
            if method == "lbp":
                linear_backprop(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.3)
            expected = []
            for _ in range(cfg.points_iters):
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                expected.append(float(loss.detach()))
            np.testing.assert_allclose(losses[i], expected, rtol=1e-5, atol=1e-7)

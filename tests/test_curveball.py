"""CurveBall against dense float64 references built from explicit Jacobians (torch.func.jacrev)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from backproplab.methods.curveball import CrossEntropy, CurveBall, MeanSquaredError, NonFiniteCurveBallError
from backproplab.models import PairwiseMaxPool1d, build_model

# the ways J v is computed: tangent replay on the recorded forward, forward-mode AD passes (fused with
# the graph-building forward, or in a pass of their own), and the double-backward trick without model=
MODES = {"replay": dict(jvp="replay"), "forward_mode": dict(jvp="forward_ad", low_memory=False),
         "forward_mode_low_memory": dict(jvp="forward_ad", low_memory=True), "double_backward": dict()}


def _curveball(model, mode, **kwargs):
    return CurveBall(model.parameters(), model=None if mode == "double_backward" else model, **MODES[mode], **kwargs)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _cnn_bn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 16, 3))


def _batch(model):
    torch.manual_seed(2)
    x = torch.randn(6, 5) if isinstance(model[0], nn.Linear) else torch.randn(6, 1, 4, 4)
    return x, torch.randint(0, 3, (6,))


def dense_reference(model, x, y, loss="ce"):
    """(flat params, gradient g, GGN matrix G) from explicit Jacobians; BatchNorm in train mode."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def outputs(flat):
        ps, i = {}, 0
        for n in names:
            ps[n] = flat[i:i + params[n].numel()].view_as(params[n])
            i += params[n].numel()
        return functional_call(model, ({**ps}, {k: v.clone() for k, v in buffers.items()}), (x,))

    def loss_of_outputs(out):
        return F.cross_entropy(out, y) if loss == "ce" else F.mse_loss(out, y)

    w = torch.cat([params[n].reshape(-1) for n in names])
    out = outputs(w)
    J = jacrev(outputs)(w).reshape(out.numel(), -1)
    HL = hessian(lambda o: loss_of_outputs(o.view_as(out)))(out.reshape(-1))
    g = torch.autograd.functional.jacobian(lambda f: loss_of_outputs(outputs(f)), w)
    return w, g, J.T @ HL @ J


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _set_z(opt, model, v):
    i = 0
    for p in model.parameters():
        opt.state[p]["z"] = v[i:i + p.numel()].view_as(p).clone()
        i += p.numel()


@pytest.mark.medium
@pytest.mark.parametrize("make", [_mlp, _cnn_bn], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("mode", MODES)
def test_ggn_vector_product_equals_explicit_jacobians(make, mode):
    model = make()
    x, y = _batch(model)
    w, g, G = dense_reference(model, x, y)
    v = torch.randn(w.numel(), generator=torch.Generator().manual_seed(3))
    # lambda = 0, beta = 1, rho = 0: the new z is exactly -(G v + g)
    opt = _curveball(model, mode, lr=1.0, momentum=0.0, lambd=0.0, auto_lambda=False)
    _set_z(opt, model, v)
    opt.step(lambda: model(x), CrossEntropy(y))
    z = _flat(opt.state[p]["z"] for p in model.parameters())
    torch.testing.assert_close(-z, G @ v + g, rtol=1e-9, atol=1e-11)


def test_autograd_loss_path_equals_closed_form():
    model = _mlp()
    x, y = _batch(model)
    target = torch.randn(6, 3)
    w, g, G = dense_reference(model, x, target, loss="mse")
    v = torch.randn(w.numel(), generator=torch.Generator().manual_seed(4))
    for loss_fn in (MeanSquaredError(target), lambda out: ((out - target) ** 2).mean()):
        model = _mlp()
        opt = CurveBall(model.parameters(), model=model, lr=1.0, momentum=0.0, lambd=0.0, auto_lambda=False)
        _set_z(opt, model, v)
        opt.step(lambda: model(x), loss_fn)
        z = _flat(opt.state[p]["z"] for p in model.parameters())
        torch.testing.assert_close(-z, G @ v + g, rtol=1e-9, atol=1e-11)


def _brute_force_min(f, center, width, rounds=6, n=81):
    """Minimise f(rho, beta) by repeatedly refined grid search."""
    c = torch.tensor(center)
    for _ in range(rounds):
        grid = torch.linspace(-width, width, n)
        rr, bb = torch.meshgrid(c[0] + grid, c[1] + grid, indexing="ij")
        vals = f(rr, bb)
        k = torch.argmin(vals)
        c = torch.stack([rr.reshape(-1)[k], bb.reshape(-1)[k]])
        width = width * 4 / n
    return c


def test_automatic_rho_beta_minimise_the_quadratic_model():
    model = _mlp()
    x, y = _batch(model)
    w, g, G = dense_reference(model, x, y)
    lam = 0.3
    H = G + lam * torch.eye(len(w))
    v = 0.1 * torch.randn(w.numel(), generator=torch.Generator().manual_seed(5))
    opt = CurveBall(model.parameters(), model=model, lambd=lam, auto_lambda=False)
    opt.curveball_state["step"] = 1  # not the first step: z = v is a real direction
    _set_z(opt, model, v)
    opt.step(lambda: model(x), CrossEntropy(y))
    rho, beta = float(opt.curveball_state["rho"]), float(opt.curveball_state["beta"])
    dz = H @ v + g

    def model_change(r, b):
        dw = r[..., None] * v - b[..., None] * dz
        return dw @ g + 0.5 * ((dw @ H) * dw).sum(-1)

    best = _brute_force_min(model_change, [0.0, 0.0], 20.0)
    assert math.isclose(rho, float(best[0]), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(beta, float(best[1]), rel_tol=1e-4, abs_tol=1e-6)
    # and the weights moved by exactly z = rho v - beta dz
    torch.testing.assert_close(_flat(p.detach() for p in model.parameters()), w + rho * v - beta * dz)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [_mlp, _cnn_bn], ids=["mlp", "cnn_bn"])
def test_first_step_is_the_exact_line_search(make, mode):
    model = make()
    x, y = _batch(model)
    w, g, G = dense_reference(model, x, y)
    H = G + 1.0 * torch.eye(len(w))
    opt = _curveball(model, mode, lambd=1.0)
    opt.step(lambda: model(x), CrossEntropy(y))
    beta = (g @ g) / (g @ H @ g)
    torch.testing.assert_close(_flat(p.detach() for p in model.parameters()), w - beta * g)
    assert float(opt.curveball_state["rho"]) == 0.0


@pytest.mark.parametrize("gamma,expected", [(0.2, 1 / 0.999**5), (-3.0, 1 / 0.999**5), (1.0, 1.0), (0.5, 1.0),
                                            (1.5, 1.0), (1.7, 0.999**5)])
def test_lambda_rule(gamma, expected):
    group = dict(lambda_factor=0.999, lambda_interval=5, lambda_low=0.5, lambda_high=1.5)
    new = CurveBall.lambda_update(torch.tensor(2.0), torch.tensor(gamma), group)
    assert math.isclose(float(new), 2.0 * expected, rel_tol=1e-12)


def test_lambda_updates_at_the_authors_steps():
    """The authors' code adapts lambda when ``count % interval == 0``: steps 0, 5, 10, ...

    lambda_low is set above any gamma, so every due step must raise lambda by 1 / factor^interval and
    no other step may move it (a lambda that never moves fails too)."""
    model = _mlp()
    x, y = _batch(model)
    opt = CurveBall(model.parameters(), model=model, lambd=1.0, lambda_low=1e9, lambda_high=2e9)
    lambdas = []
    for _ in range(12):
        opt.step(lambda: model(x), CrossEntropy(y))
        lambdas.append(float(opt.curveball_state["lambd"]))
    up = 1 / 0.999 ** 5
    expected = [up ** (i // 5 + 1) for i in range(12)]  # after step i: raised on steps 0, 5, 10
    for got, want in zip(lambdas, expected):
        assert math.isclose(got, want, rel_tol=1e-12)


@pytest.mark.parametrize("lambd", [0.0, 0.3])
@pytest.mark.parametrize("fixed", [dict(lr=0.05, momentum=0.5), dict(lr=0.05), dict(momentum=0.5), dict()],
                         ids=["lr+momentum", "lr", "momentum", "automatic"])
def test_gamma_is_the_ratio_to_the_quadratic_models_change(fixed, lambd):
    """Linear least squares: the loss is exactly quadratic with Hessian G = GGN, so the actual change
    of a step dw is g^T dw + 1/2 dw^T G dw and the model's is g^T dw + 1/2 dw^T (G + lambda I) dw, in
    closed form. gamma must be their ratio (1 when lambda = 0) for every step taken, fixed lr or not."""
    torch.manual_seed(7)
    X, t = torch.randn(30, 4), torch.randn(30, 2)
    model = nn.Linear(4, 2)
    opt = CurveBall(model.parameters(), model=model, lambd=lambd, lambda_interval=1, lambda_low=-1e9,
                    lambda_high=1e9, **fixed)
    for step in range(4):
        w, g, G = dense_reference(model, X, t, loss="mse")
        opt.step(lambda: model(X), MeanSquaredError(t))
        dw = _flat(p.detach() for p in model.parameters()) - w
        actual = g @ dw + 0.5 * dw @ G @ dw
        predicted = actual + 0.5 * lambd * dw @ dw
        assert math.isclose(float(opt.curveball_state["gamma"]), float(actual / predicted), rel_tol=1e-9), step


def _paper_curveball(model, batches, lambd, interval, factor, low, high):
    """Algorithm 1 of the paper written out with dense matrices: the loss on each batch before its step."""
    w = _flat(p.detach() for p in model.parameters()).clone()
    z = torch.zeros_like(w)
    losses, lambdas = [], []
    for count, (x, y) in enumerate(batches):
        with torch.no_grad():
            for p, v in zip(model.parameters(), torch.split(w, [p.numel() for p in model.parameters()])):
                p.copy_(v.view_as(p))
        _, g, G = dense_reference(model, x, y)
        loss = F.cross_entropy(model(x), y)
        H = G + lambd * torch.eye(len(w))
        dz = H @ z + g
        A = torch.tensor([[dz @ H @ dz, z @ H @ dz], [z @ H @ dz, z @ H @ z]])
        b = torch.stack([g @ dz, g @ z])
        sol = torch.linalg.pinv(A) @ b  # [beta, -rho]; z = 0 makes A singular (the exact line search)
        beta, rho = sol[0], -sol[1]
        z = rho * z - beta * dz
        w = w + z
        losses.append(float(loss.detach()))
        if count % interval == 0:
            with torch.no_grad():
                for p, v in zip(model.parameters(), torch.split(w, [p.numel() for p in model.parameters()])):
                    p.copy_(v.view_as(p))
                new = F.cross_entropy(model(x), y)
            ratio = (new - loss) / (-(sol @ b) + 0.5 * sol @ A @ sol)
            lambd = lambd / factor ** interval if ratio < low else lambd * factor ** interval if ratio > high else lambd
        lambdas.append(float(lambd))
    return losses, lambdas


@pytest.mark.medium
@pytest.mark.parametrize("mode", ["replay", "forward_mode", "double_backward"])
def test_losses_equal_the_paper_written_out_with_automatic_lambda(mode):
    torch.manual_seed(8)
    batches = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(16)]
    settings = dict(lambd=1.0, lambda_interval=5, lambda_factor=0.9, lambda_low=0.98, lambda_high=1.02)
    reference, ref_lambdas = _paper_curveball(_mlp(), batches, 1.0, 5, 0.9, 0.98, 1.02)
    assert len(set(ref_lambdas)) >= 3  # lambda moved twice: the automatic rule is exercised
    model = _mlp()
    opt = _curveball(model, mode, **{k: v for k, v in settings.items()})
    ours = [float(opt.step(lambda: model(x), CrossEntropy(y))[0]) for x, y in batches]
    for i, (a, b) in enumerate(zip(ours, reference)):
        assert abs(a - b) <= 1e-12, (i, a, b)


def test_converges_on_a_convex_quadratic():
    torch.manual_seed(6)
    A, b = torch.randn(40, 8), torch.randn(40, 1)
    model = nn.Linear(8, 1, bias=False)
    opt = CurveBall(model.parameters(), model=model)
    for _ in range(60):
        opt.step(lambda: model(A), MeanSquaredError(b))
    solution = torch.linalg.lstsq(A, b).solution.T
    torch.testing.assert_close(model.weight.detach(), solution, rtol=1e-6, atol=1e-8)


def test_state_dict_round_trip_resumes_bit_identically():
    x, y = _batch(_mlp())

    def run(model, opt, n):
        for _ in range(n):
            opt.step(lambda: model(x), CrossEntropy(y))

    model = _mlp()
    opt = CurveBall(model.parameters(), model=model)
    run(model, opt, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # like torch.optim, state_dict holds references
    run(model, opt, 7)
    other = _mlp()
    other.load_state_dict(saved_model)
    opt2 = CurveBall(other.parameters(), model=other)
    opt2.load_state_dict(saved_opt)
    run(other, opt2, 7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert torch.equal(opt.curveball_state["lambd"], opt2.curveball_state["lambd"])


@pytest.mark.parametrize("mode", ["replay", "forward_mode", "forward_mode_low_memory"])  # needs model=
def test_batchnorm_statistics_move_once_per_step(mode):
    model = _cnn_bn()
    x, y = _batch(model)
    reference = _cnn_bn()
    reference(x)  # one ordinary train-mode forward
    opt = _curveball(model, mode, lambda_interval=1)  # + the lambda pass
    opt.step(lambda: model(x), CrossEntropy(y))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("mode", ["auto", "forward_mode", "forward_mode_low_memory"])
def test_dropout_mask_is_shared_by_the_passes_of_one_step(mode):
    """With dropout, the first step is still the exact line search for the *same* mask in every pass."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    torch.manual_seed(11)
    mask_state = torch.get_rng_state()
    # the reference: the same mask, drawn from the same RNG state, fixed in a deterministic model
    model.eval()
    mask = F.dropout(torch.ones(6, 8), 0.5, training=True)
    torch.set_rng_state(mask_state)
    fixed = nn.Sequential(model[0], model[1], _Mul(mask), model[3])
    w, g, G = dense_reference(fixed, x, y)
    model.train()
    opt = CurveBall(model.parameters(), model=model, lambd=1.0, **MODES.get(mode, {}))
    opt.step(lambda: model(x), CrossEntropy(y))
    if mode == "auto":  # the mask is not recorded, so "auto" fell back to forward-mode AD
        assert "Dropout is in train mode" in opt.replay_refused
    beta = (g @ g) / (g @ (G + torch.eye(len(w))) @ g)
    torch.testing.assert_close(_flat(p.detach() for p in model.parameters()), w - beta * g)


class _Mul(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_frozen_parameters_are_skipped():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    x, y = _batch(model)
    opt = CurveBall(model.parameters(), model=model)
    opt.step(lambda: model(x), CrossEntropy(y))
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[2].weight, _mlp()[2].weight)


class _NonFiniteValue(CrossEntropy):
    """Finite output products but a non-finite loss value: only the check of the loss itself can catch it."""

    def __call__(self, outputs):
        return super().__call__(outputs) * float("nan")


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("cause", ["nan input", "overflowing product, fixed lr/momentum",
                                   "the loss value alone, fixed lr/momentum"])
def test_non_finite_loss_never_reaches_the_weights(mode, cause):
    model = _mlp()
    x, y = _batch(model)
    fixed = {} if cause == "nan input" else dict(lr=0.1, momentum=0.9)
    loss = _NonFiniteValue(y) if cause.startswith("the loss value") else CrossEntropy(y)
    if cause == "nan input":
        x[0, 0] = float("nan")
    before = [p.clone() for p in model.parameters()]
    opt = CurveBall(model.parameters(), model=model, on_nonfinite=mode, **fixed)
    if fixed:  # step 1: no Levenberg-Marquardt update, so the step solves no system
        opt.curveball_state["step"] = 1
    if cause.startswith("overflowing"):  # the loss is finite but J z overflows, so dz is not
        _set_z(opt, model, torch.full((sum(p.numel() for p in model.parameters()),), 1e307))
    if mode == "raise":
        with pytest.raises(NonFiniteCurveBallError, match="not finite"):
            opt.step(lambda: model(x), loss)
    else:
        opt.step(lambda: model(x), loss)
        assert int(opt.curveball_state["skipped"]) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_parameter_groups_must_share_settings():
    model = _mlp()
    with pytest.raises(ValueError, match="same 'lr'"):
        CurveBall([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}], model=model)
    CurveBall([{"params": model[0].parameters()}, {"params": model[2].parameters()}], model=model)


def test_runner_optimizer_curveball_trains():
    from backproplab.data import load_dataset
    from backproplab.models import build_model
    from backproplab.train import TrainConfig, fit

    torch.set_default_dtype(torch.float32)
    data = load_dataset("digits", n_train=300)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, 10, widths=(32,))
    history = fit(model, data, TrainConfig(optimizer="curveball", lr=0, momentum=0, epochs=3, batch_size=50))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"] and history[-1]["test_acc"] > 0.8


def test_low_memory_is_the_default_for_networks_with_normalisation_layers():
    bn = _cnn_bn()
    assert CurveBall(bn.parameters(), model=bn).low_memory
    mlp = _mlp()
    assert not CurveBall(mlp.parameters(), model=mlp).low_memory
    assert not CurveBall(bn.parameters(), model=bn, low_memory=False).low_memory


# ---------------------------------------------------------------- tangent replay against forward-mode AD


class _Scaled(nn.Module):
    """A layer with a parameter used in its own forward: no tangent rule."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * self.scale


class _Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh())

    def forward(self, x):
        return x + self.inner(x)


def _chains():
    """Chains of supported layers, each with an input of the right shape."""
    torch.manual_seed(20)
    frozen_first = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ELU(), nn.Linear(6, 3))
    frozen_first[0].requires_grad_(False)
    frozen_first[2].weight.requires_grad_(False)  # a frozen weight with a trained bias
    bn_eval = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Sigmoid(), nn.Flatten(), nn.Dropout(0.3),
                            nn.Linear(3 * 6, 3))
    bn_eval[1].eval(), bn_eval[4].eval()
    bn_eval[1].running_mean.uniform_(-0.5, 0.5), bn_eval[1].running_var.uniform_(0.5, 2.0)
    shared = nn.Linear(20, 20)
    return {
        "mlp: leaky relu, sigmoid": (nn.Sequential(nn.Flatten(), nn.Linear(8, 7), nn.LeakyReLU(0.1), nn.Linear(7, 5),
                                                   nn.Sigmoid(), nn.Linear(5, 3)), (6, 2, 4)),
        "cnn: bn, maxpool, no-affine bn, gelu, avgpool": (
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(4, affine=False),
                          nn.GELU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)), (6, 2, 8, 8)),
        "cnn: adaptive max pool, bn without running stats": (
            nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3, track_running_stats=False), nn.Tanh(),
                          nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)), (6, 1, 9, 9)),
        "conv1d: eval-mode bn, eval-mode dropout, 1-d max pool": (
            nn.Sequential(*bn_eval[:3], nn.MaxPool1d(2, ceil_mode=True), nn.Upsample(scale_factor=2), *bn_eval[3:]),
            (6, 2, 8)),
        "conv1d: pairwise max pool, odd length": (
            nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), PairwiseMaxPool1d(2), nn.Flatten(), nn.Linear(12, 3)),
            (6, 2, 9)),
        "the small CNN on 1-d signals": (build_model("cnn", (1, 12), 3, channels=(3, 4), hidden=8), (6, 1, 12)),
        "linear on a sequence": (nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)), (6, 4, 5)),
        "frozen first layer and weight": (frozen_first, (6, 5)),
        # batch 6 below the layer widths: the second product takes the Gram form for the hidden layers
        "wide mlp, small batch (Gram form)": (nn.Sequential(nn.Linear(16, 20, bias=False), nn.Tanh(), nn.Linear(20, 20),
                                                            nn.ReLU(), nn.Linear(20, 3)), (6, 16)),
        "one layer called twice": (nn.Sequential(nn.Linear(16, 20), nn.Tanh(), shared, nn.ReLU(), shared,
                                                 nn.Linear(20, 3)), (6, 16)),
    }


@pytest.mark.medium
@pytest.mark.parametrize("name", list(_chains()))
@pytest.mark.parametrize("fixed", [False, True], ids=["auto", "fixed"])
def test_tangent_replay_equals_forward_mode_ad(name, fixed):
    """Four steps by tangent replay and by forward-mode AD give the same weights and buffers (float64)."""
    net, shape = _chains()[name]
    x, y = torch.randn(*shape, generator=torch.Generator().manual_seed(21)), torch.randint(0, 3, (shape[0],))
    settings = dict(lr=0.5, momentum=0.5) if fixed else {}
    results = []
    for jvp in ("replay", "forward_ad"):
        model = copy.deepcopy(net)
        opt = CurveBall([p for p in model.parameters() if p.requires_grad], model=model, jvp=jvp,
                        lambda_interval=2, **settings)
        for _ in range(4):
            opt.step(lambda: model(x), CrossEntropy(y))
        results.append(_flat([*model.parameters(), *(b.double() for b in model.buffers())]))
        if jvp == "replay":
            assert opt.replay_refused is None
    assert not torch.equal(results[0], _flat([*net.parameters(), *(b.double() for b in net.buffers())]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


def _auto_against_forward_ad(net, x, y, steps=3):
    """Steps with jvp="auto" and with forward-mode AD agree; returns why "auto" did not replay (or None)."""
    results, optimizers = [], []
    for jvp in ("auto", "forward_ad"):
        model = copy.deepcopy(net)
        optimizers.append(CurveBall(model.parameters(), model=model, jvp=jvp))
        for _ in range(steps):
            torch.manual_seed(23)  # the same dropout masks for both
            optimizers[-1].step(lambda: model(x), CrossEntropy(y))
        results.append(_flat(model.parameters()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    return optimizers[0].replay_refused


def _with_hook():
    model = _mlp()
    model[1].register_forward_hook(lambda m, i, o: 2 * o)
    return model


@pytest.mark.parametrize("make,reason", [
    (lambda: nn.Sequential(nn.Linear(5, 6), _Residual(6), nn.Linear(6, 3)), "Linear's input is not the previous"),
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)), "Dropout is in train mode"),
    (lambda: nn.Sequential(nn.Linear(5, 6), _Scaled(), nn.Linear(6, 3)), "_Scaled has no tangent rule"),
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)), "LayerNorm has no tangent rule"),
    (_with_hook, "Tanh has forward hooks of its own"),
], ids=["residual", "dropout", "own parameter", "layernorm", "hook"])
def test_replay_refuses_what_it_cannot_follow(make, reason):
    """"auto" falls back to forward-mode AD (same result), says why; "replay" raises with the reason."""
    torch.manual_seed(22)
    net = make()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    assert reason in _auto_against_forward_ad(net, x, y)
    model = copy.deepcopy(net)
    with pytest.raises(ValueError, match="cannot replay"):
        CurveBall(model.parameters(), model=model, jvp="replay").step(lambda: model(x), CrossEntropy(y))


def test_one_decorated_function_makes_a_new_layer_type_replayable():
    """A layer with a parameter of its own (y = x * exp(g)) has no rule, so "auto" falls back to forward AD;
    registering one function, t_y = exp(g) (t + x t_g), makes the same model replay, and four steps then
    equal forward-mode AD's (float64). A wrong rule (the parameter's term dropped) is caught by the same check."""
    from backproplab.methods.curveball import TANGENT_RULES, register_tangent_rule
    from backproplab.methods.curveball.tangent_replay import param_tangents

    class Gain(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, width))

        def forward(self, x):
            return x * self.weight.exp()

    torch.manual_seed(30)
    net = nn.Sequential(nn.Linear(5, 6), Gain(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    assert "Gain has no tangent rule" in _auto_against_forward_ad(net, x, y)
    try:
        @register_tangent_rule(Gain, has_params=True)
        def _gain(m, kept, t, tangents):
            tw, _ = param_tangents(m, tangents)
            own = kept * tw if tw is not None else None
            total = own if t is None else t if own is None else t + own
            return None if total is None else total * m.weight.exp()

        assert _auto_against_forward_ad(net, x, y) is None  # replayed, and equal to forward AD

        @register_tangent_rule(Gain, has_params=True)
        def _gain_without_its_parameter(m, kept, t, tangents):
            return None if t is None else t * m.weight.exp()

        with pytest.raises(AssertionError):
            _auto_against_forward_ad(net, x, y)
    finally:
        TANGENT_RULES.pop(Gain, None)


@pytest.mark.parametrize("saved", [True, False], ids=["statistics from the forward's node", "recomputed"])
def test_batchnorm_tangent_rule_equals_torch_func_jvp(saved):
    """The closed-form batch-norm JVP (train mode) against torch.func.jvp of F.batch_norm; the recomputed
    statistics are the path taken where the forward's node does not expose them (cuDNN, say)."""
    from backproplab.methods.curveball.tangent_replay import _batchnorm_tangent

    torch.manual_seed(24)
    bn = nn.BatchNorm2d(3)
    nn.init.uniform_(bn.weight, 0.5, 2.0), nn.init.uniform_(bn.bias, -1.0, 1.0)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    t, tw, tb = torch.randn(5, 3, 4, 4), torch.randn(3), torch.randn(3)
    node = bn(x).grad_fn
    kept = (x.detach(), node._saved_result1, node._saved_result2) if saved else (x.detach(), None, None)
    _, expected = torch.func.jvp(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=bn.eps),
                                 (x.detach(), bn.weight.detach(), bn.bias.detach()), (t, tw, tb))
    torch.testing.assert_close(_batchnorm_tangent(bn, kept, t, tw, tb), expected, rtol=1e-10, atol=1e-12)
    _, only_params = torch.func.jvp(lambda w, b: F.batch_norm(x.detach(), None, None, w, b, training=True),
                                    (bn.weight.detach(), bn.bias.detach()), (tw, tb))
    torch.testing.assert_close(_batchnorm_tangent(bn, kept, None, tw, tb), only_params, rtol=1e-10, atol=1e-12)


_DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from backproplab.data import load_dataset
from backproplab.models import build_model
from backproplab.train import TrainConfig, fit, leave_distributed
if "RANK" in os.environ:
    dist.init_process_group("gloo")
data = load_dataset("digits", n_train=256)
torch.manual_seed(0)
model = build_model("mlp", data.input_shape, 10, widths=(32,))
fit(model, data, TrainConfig(optimizer="curveball", lr=0, momentum=0, epochs=1, batch_size=64))
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save(model.state_dict(), sys.argv[1])
if dist.is_initialized():
    leave_distributed()  # the clean ending every multi-process test script shares (why: its docstring)
"""


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_on_the_combined_batch(tmp_path, monkeypatch):
    """Under DDP the product dz and the 2x2 system are averaged over ranks: 2 x 32 examples == 1 x 64."""
    import os
    import runpy
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(_DDP_SCRIPT)
    torch.set_default_dtype(torch.float32)  # as in a fresh process; the autouse fixture restores it
    with monkeypatch.context() as m:  # the one-process reference in this process: a second start costs seconds
        m.setattr(sys, "argv", [str(script), str(tmp_path / "one.pt")])
        runpy.run_path(str(script), run_name="__main__")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path / "two.pt")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_replay_steps_aside_under_autocast():
    """Under autocast the layers run in bfloat16 with float32 weights: "auto" uses forward-mode AD."""
    torch.manual_seed(25)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).float()
    x, y = torch.randn(8, 5, dtype=torch.float32), torch.randint(0, 3, (8,))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    opt = CurveBall(model.parameters(), model=model)
    losses = [float(opt.step(forward, CrossEntropy(y))[0]) for _ in range(5)]
    assert "autocast" in opt.replay_refused and losses[-1] < losses[0]


@pytest.mark.parametrize("make,reason", [
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.ELU(inplace=True), nn.Linear(6, 3)), "ELU(inplace=True) overwrote"),
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Identity(), nn.ReLU(inplace=True), nn.Linear(6, 3)),
     None),  # ReLU keeps its output: in place is fine
], ids=["elu in place", "relu in place"])
def test_in_place_layers(make, reason):
    torch.manual_seed(26)
    refused = _auto_against_forward_ad(make(), torch.randn(6, 5), torch.randint(0, 3, (6,)))
    assert (refused is None) if reason is None else (reason in refused)


def test_replay_notices_a_recorded_tensor_modified_in_place():
    """GELU keeps its input; an in-place op after it changes that input (autograd's saved copy too)."""
    from backproplab.methods.curveball.tangent_replay import TangentTape as _TangentTape

    torch.manual_seed(27)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3))
    tape = _TangentTape(list(model.parameters()))
    handle = torch.nn.modules.module.register_module_forward_hook(tape.hook)
    try:
        h = model[0](torch.randn(4, 5))
        out = model[2](model[1](h))
        with torch.no_grad():
            h.mul_(2.0)  # changes what GELU keeps, as a later in-place op would
    finally:
        handle.remove()
    tape.check(out)
    assert "GELU keeps for its tangent rule was modified in place" in tape.reason


@pytest.mark.parametrize("bias", [True, False])
def test_gram_form_of_the_second_product_equals_torch_func_jvp(bias):
    """J dz with dz = G + lambda z: the Gram form (batch below the layer width) against torch.func.jvp."""
    from backproplab.methods.curveball.tangent_replay import TangentTape as _TangentTape

    torch.manual_seed(28)
    model = nn.Sequential(nn.Linear(16, 20, bias=bias), nn.Tanh(), nn.Linear(20, 20, bias=bias), nn.Linear(20, 3))
    params = list(model.parameters())
    x, y = torch.randn(6, 16), torch.randint(0, 3, (6,))
    zs = [torch.randn_like(p) for p in params]
    tape = _TangentTape(params, gram=True)
    handle = torch.nn.modules.module.register_module_forward_hook(tape.hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    tape.check(out)
    assert tape.reason is None and tape.gram_calls == {0, 2}
    jz = tape.jvp({id(p): z for p, z in zip(params, zs)})
    hvp, jl = CrossEntropy(y).output_grad_and_hvp(out)
    grads = torch.autograd.grad(out, params, hvp(jz) + jl)
    lam = torch.tensor(0.7)
    dzs = [g + lam * z for g, z in zip(grads, zs)]
    got = tape.jvp({id(p): d for p, d in zip(params, dzs)}, lambd=lam)
    names = [n for n, _ in model.named_parameters()]
    _, expected = torch.func.jvp(lambda *ps: functional_call(model, dict(zip(names, ps)), (x,)),
                                 tuple(p.detach() for p in params), tuple(dzs))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _record(model, x, how):
    """A tape of ``model(x)``, recorded by ``recording`` or by the global forward hook."""
    from backproplab.methods.curveball.tangent_replay import TangentTape as _TangentTape

    tape = _TangentTape(list(model.parameters()))
    if how == "recording":
        with tape.recording(model):
            out = model(x)
    else:
        with torch.nn.modules.module.register_module_forward_hook(tape.hook):
            out = model(x)
    tape.check(out)
    return tape, out


def test_recording_equals_the_forward_hook_and_puts_the_layers_back():
    """``recording`` wraps each leaf layer's forward for the block: the same layers are recorded as by the
    global forward hook and J v is the same to the bit; every layer's forward is put back afterwards (a forward
    of the layer's own too), also when the forward raises; a layer called with keyword arguments is refused."""
    from backproplab.methods.curveball.tangent_replay import TangentTape as _TangentTape

    torch.manual_seed(31)
    model = build_model("cnn", (1, 8, 8), 3, channels=(3, 4), hidden=8)
    own = model.head.forward  # a bound method set on the instance, as a patching library would
    model.head.forward = own
    x = torch.randn(5, 1, 8, 8)
    v = {id(p): torch.randn_like(p) for p in model.parameters()}
    wrapped, _ = _record(model, x, "recording")
    hooked, _ = _record(model, x, "hook")
    assert wrapped.reason is None and hooked.reason is None
    assert [m for m, _, _ in wrapped.calls] == [m for m, _, _ in hooked.calls] and len(wrapped.calls) == 10
    assert torch.equal(wrapped.jvp(v), hooked.jvp(v))

    def put_back():
        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        return model.head.__dict__["forward"] is own and all("forward" not in vars(m) for m in leaves[:-1])

    assert put_back()
    with pytest.raises(RuntimeError):
        with _TangentTape(list(model.parameters())).recording(model):
            model(torch.randn(5, 2, 8, 8))  # two channels where the first convolution takes one
    assert put_back()
    tape = _TangentTape(list(model.parameters()))
    with tape.recording(model):
        model.features[0](input=x)
    assert "Conv2d is called with keyword arguments" in tape.reason


def test_leaf_modules_are_the_childless_modules_once_each():
    """``_leaf_modules`` (read from ``_modules``, without ``modules()``'s names) lists the modules that ``modules()``
    lists without children, in the same order: nested containers, a layer registered three times, empty (None)
    child slots, and a model that is itself one layer."""
    from backproplab.methods.curveball.tangent_replay import _leaf_modules

    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), shared), nn.Sequential(shared, nn.Tanh()),
                          shared, nn.Identity())
    model.register_module("empty", None)
    holder = nn.Module()
    holder.register_module("slot", None)  # its only child slot is empty: a leaf
    model.add_module("holder", holder)
    expected = [m for m in model.modules() if next(m.children(), None) is None]
    assert len(expected) == 6
    assert [id(m) for m in _leaf_modules(model)] == [id(m) for m in expected]
    lone = nn.Linear(2, 2)
    assert _leaf_modules(lone) == [lone]


def test_a_layer_whose_weight_is_a_plain_tensor_replays_as_forward_mode_does():
    """A Linear whose weight was replaced by a plain tensor (frozen, not a parameter): the record reads parameters
    from ``_parameters``, so the replayed step (batch below the layer width, where the Gram form is considered)
    equals forward-mode AD's."""
    results = []
    for jvp in ("replay", "forward_ad"):
        torch.manual_seed(37)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        frozen = model[2].weight.detach().clone()
        del model[2].weight
        model[2].weight = frozen
        x, y = torch.randn(2, 4), torch.randint(0, 3, (2,))
        opt = CurveBall(model.parameters(), model=model, jvp=jvp)
        for _ in range(3):
            opt.step(lambda: model(x), CrossEntropy(y))
        assert opt.replay_refused == (None if jvp == "replay" else "jvp='forward_ad'")
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cross", [True, False])
def test_param_dots_equal_per_parameter_sums(cross):
    """The step's per-parameter dz.dz (and dz.z, z.z) against exact sums over Python floats, with a gradient
    laid out channels-last (not a view of its flat form)."""
    from backproplab.methods.curveball.optimizer import _param_dots

    torch.manual_seed(35)
    shapes = [(4, 3, 3, 3), (4,), (5, 7)]
    dzs, zs = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
    dzs[0] = dzs[0].contiguous(memory_format=torch.channels_last)
    pairs = [(dzs, dzs), (dzs, zs), (zs, zs)][:3 if cross else 1]
    expected = torch.tensor([[math.fsum(a * b for a, b in zip(u.flatten().tolist(), w.flatten().tolist()))
                              for u, w in zip(us, ws)] for us, ws in pairs])
    torch.testing.assert_close(_param_dots(dzs, zs, cross), expected, rtol=1e-12, atol=0)


def test_cross_entropy_output_products_equal_autograd():
    """CrossEntropy's J_L = (softmax - onehot) / B and H_L v against torch.func's gradient and Hessian (B = 7, so a
    misplaced 1/B shows); the product leaves v alone and gives the same on a second call."""
    torch.manual_seed(36)
    out, y, v = torch.randn(7, 4), torch.randint(0, 4, (7,)), torch.randn(7, 4)
    hvp, grad = CrossEntropy(y).output_grad_and_hvp(out)
    loss = lambda o: F.cross_entropy(o, y)  # noqa: E731
    torch.testing.assert_close(grad, torch.func.grad(loss)(out), rtol=1e-12, atol=1e-14)
    expected = (hessian(loss)(out).reshape(28, 28) @ v.reshape(-1)).view(7, 4)
    kept = v.clone()
    torch.testing.assert_close(hvp(v), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(v, kept) and torch.equal(hvp(v), hvp(v))


@pytest.mark.parametrize("in_place_after_pooling", [False, True])
def test_relu_before_max_pooling_is_masked_after_the_pooling(in_place_after_pooling):
    """Each ReLU followed by max pooling replays as gather-then-mask on the pooled values; a pooled output
    changed in place later in the forward (an in-place ReLU after the pooling) keeps its ReLU's replay as it is.
    Either way J v equals torch.func.jvp (float64)."""
    torch.manual_seed(33)
    after = [nn.ReLU(inplace=True)] if in_place_after_pooling else []
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *after,
                          nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(5, 1, 8, 8)
    tape, _ = _record(model, x, "recording")
    assert tape.reason is None
    assert tape.masked_after_pooling == ({5} if in_place_after_pooling else {1, 4})
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    names = [n for n, _ in model.named_parameters()]
    _, expected = torch.func.jvp(lambda *ps: functional_call(model, dict(zip(names, ps)), (x,)),
                                 tuple(p.detach() for p in params), tuple(v))
    torch.testing.assert_close(tape.jvp({id(p): t for p, t in zip(params, v)}), expected, rtol=1e-10, atol=1e-12)


_SYSTEMS = {  # a11, a12, a22, b1, b2
    "regular": (2.0, 0.5, 1.0, 1.0, 0.25),
    "singular (z parallel to dz)": (4.0, 2.0, 1.0, 1.0, 0.5),
    "zero curvature and gradient": (0.0, 0.0, 0.0, 0.0, 0.0),
    "negative curvature": (-1.0, 0.2, 0.5, 0.3, 0.1),
}


@pytest.mark.parametrize("fixed", [dict(), dict(lr=0.1), dict(momentum=0.9), dict(first=True)],
                         ids=["automatic", "fixed lr", "fixed momentum", "first step"])
@pytest.mark.parametrize("system", list(_SYSTEMS))
def test_the_host_solve_equals_the_device_solve(system, fixed):
    """The 2x2 solve on numpy float64 scalars (on_nonfinite="raise") and on float64 tensors ("skip") agree,
    non-finite results included (a zero system gives nan, not an exception); the regular system's solution is
    numpy's linalg.solve."""
    import numpy as np

    first = fixed.get("first", False)
    host = CurveBall.solve(*map(np.float64, _SYSTEMS[system]), *(np.float64(fixed[k]) if k in fixed else None
                                                                  for k in ("lr", "momentum")), first=first)
    device = CurveBall.solve(*map(torch.tensor, _SYSTEMS[system]), *(torch.tensor(fixed[k]) if k in fixed else None
                                                                     for k in ("lr", "momentum")), first=first)
    for h, d in zip(host, device):
        assert isinstance(h, np.float64) and (h == float(d) or (math.isnan(h) and math.isnan(float(d)))), (h, d)
    if system == "regular" and not fixed:
        a11, a12, a22, b1, b2 = _SYSTEMS[system]
        assert np.allclose([host[0], -host[1]], np.linalg.solve([[a11, a12], [a12, a22]], [b1, b2]))


@pytest.mark.parametrize("fixed", [dict(), dict(lr=0.05, momentum=0.5)], ids=["automatic", "fixed"])
def test_raise_and_skip_modes_take_the_same_steps(fixed):
    """"raise" solves the 2x2 system on the host in double precision, "skip" on the device: on a float64
    network ten steps (two of them Levenberg-Marquardt updates) agree in weights, rho, beta, lambda and gamma."""
    runs = []
    for mode in ("raise", "skip"):
        model = _cnn_bn()
        x, y = _batch(model)
        opt = CurveBall(model.parameters(), model=model, on_nonfinite=mode, lambda_interval=4, **fixed)
        for _ in range(10):
            opt.step(lambda: model(x), CrossEntropy(y))
        runs.append((_flat(model.parameters()), {k: float(opt.curveball_state[k]) for k in
                                                 ("rho", "beta", "lambd", "gamma")}))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_used_twice_keeps_its_parameters(mode):
    """functional_call does not restore a parameter of a layer registered twice; the optimizer must."""
    torch.manual_seed(29)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))
    weight, initial = shared.weight, shared.weight.detach().clone()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt = _curveball(model, mode)
    for _ in range(2):
        opt.step(lambda: model(x), CrossEntropy(y))
    assert model[0].weight is weight and model[2].weight is weight and isinstance(weight, nn.Parameter)
    assert not torch.equal(weight, initial)


def test_closure_form_equals_the_model_and_loss_form():
    """``opt.step(closure)`` as torch.optim users write it gives the same steps as step(model_fn, loss_fn)."""
    x, y = _batch(_mlp())
    runs = []
    for form in ("pair", "closure", "closure_loss_module"):
        model = _mlp()
        opt = CurveBall(model.parameters(), model=model, lambda_interval=2)
        criterion = nn.CrossEntropyLoss()
        for _ in range(4):
            if form == "pair":
                opt.step(lambda: model(x), CrossEntropy(y))
            elif form == "closure":  # returns the loss, as torch.optim's step(closure) does
                loss = opt.step(lambda: F.cross_entropy(model(x), y))
                assert torch.is_tensor(loss) and loss.shape == () and not loss.requires_grad
            else:  # a loss *module* in the closure must not be taken for a layer of the model
                opt.step(lambda: criterion(model(x), y))
        assert opt.replay_refused is None
        runs.append(_flat(p.detach() for p in model.parameters()))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(runs[2], runs[0], rtol=1e-12, atol=1e-14)


def test_closure_that_calls_backward_or_has_no_model_gets_a_clear_error():
    model = _mlp()
    x, y = _batch(model)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="without calling backward"):
        CurveBall(model.parameters(), model=model).step(closure)
    with pytest.raises(TypeError, match="model=model"):
        CurveBall(model.parameters()).step(lambda: F.cross_entropy(model(x), y))


def _wide_mlp():  # batch 6 < its layers: the second product takes the Gram form
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3))


@pytest.mark.parametrize("make", [_cnn_bn, _wide_mlp], ids=["cnn_bn", "wide_mlp"])
@pytest.mark.parametrize("mode", ["replay", "forward_mode", "double_backward"])
def test_fill_grad_writes_the_loss_gradient(mode, make):
    model = make()
    x, y = _batch(model)
    _, g, _ = dense_reference(model, x, y)
    opt = _curveball(model, mode, fill_grad=True)
    _set_z(opt, model, 0.1 * torch.randn(len(g), generator=torch.Generator().manual_seed(9)))
    opt.curveball_state["step"] = 1
    opt.step(lambda: model(x), CrossEntropy(y))
    torch.testing.assert_close(_flat(p.grad for p in model.parameters()), g, rtol=1e-10, atol=1e-12)


def test_learning_rate_schedulers_drive_a_fixed_lr():
    model = _mlp()
    x, y = _batch(model)
    opt = CurveBall(model.parameters(), model=model, lr=0.4, momentum=0.5)
    assert not opt.param_groups[0]["auto_lr"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    betas = []
    for _ in range(3):
        opt.step(lambda: model(x), CrossEntropy(y))
        betas.append(float(opt.curveball_state["beta"]))
        scheduler.step()
    assert betas == [0.4, 0.2, 0.1]
    auto = CurveBall(model.parameters(), model=model, lr=0.4, auto_lr=True)
    assert auto.param_groups[0]["auto_lr"] and auto.param_groups[0]["auto_momentum"]
    with pytest.raises(ValueError, match="auto_lr=False needs a number"):
        CurveBall(model.parameters(), model=model, auto_lr=False)


def test_state_saved_with_lr_none_loads_as_automatic():
    model = _mlp()
    opt = CurveBall(model.parameters(), model=model)
    sd = opt.state_dict()
    for g in sd["param_groups"]:  # what a checkpoint written before auto_lr existed holds
        g["lr"], g["momentum"] = None, None
        del g["auto_lr"], g["auto_momentum"]
    fresh = CurveBall(model.parameters(), model=model, lr=0.1, momentum=0.1)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["auto_lr"] and fresh.param_groups[0]["auto_momentum"]


def test_lbfgs_baseline_runs_its_line_search():
    """More than one function evaluation per iteration, and Rosenbrock solved in tens of iterations (with
    max_eval = 1 the strong-Wolfe search never evaluates and the iterates stall)."""
    from backproplab.experiments.curveball import CurveBallConfig, solve_toy

    cfg = CurveBallConfig()
    result = solve_toy("rosenbrock", "lbfgs", 0, cfg, lr=1.0, max_iters=300)
    assert result["solved"] and result["iterations"] < 100
    assert result["forward_passes"] > result["iterations"] + 1


def test_rahimi_recht_problem_is_ill_conditioned():
    from backproplab.experiments.curveball import CurveBallConfig, Toy, _rahimi_recht_problem, solve_toy

    x, y = _rahimi_recht_problem()
    a = torch.linalg.lstsq(x, y).solution.T
    s = torch.linalg.svdvals(a)
    assert math.isclose(float(s[0] / s[-1]), 1e5, rel_tol=1e-6)
    toy = Toy("rahimi_recht", 3)
    w1, w2 = toy.net[0].weight, toy.net[1].weight
    torch.testing.assert_close(toy(None), ((x @ w1.T @ w2.T - y) / math.sqrt(y.numel())).reshape(-1))
    stochastic = Toy("rahimi_recht_stochastic", 3, rr_batch=50)
    assert stochastic.sample().shape == (50,) and not torch.equal(stochastic.sample(), stochastic.sample())
    # the full-batch loss at an exact factorisation W2 W1 = A is zero: "solved" means the target is fitted
    toy.set_flat(torch.cat([torch.eye(6).reshape(-1), a.reshape(-1)]).double())
    assert toy.loss() < 1e-20 and toy.solved(CurveBallConfig())
    # plain gradient descent cannot fit the small singular directions within a short budget
    assert not solve_toy("rahimi_recht", "sgd", 0, CurveBallConfig(), lr=0.03, max_iters=500)["solved"]


# ---------------------------------------------------------------- every model of the zoo, BatchNorm in both modes

ZOO = [("mlp", (1, 8, 8), {}), ("cnn", (1, 8, 8), {}), ("cnn", (1, 8, 8), {"batchnorm": True}),
       ("resnet18", (3, 8, 8), {"width": 0.125}), ("vgg11", (3, 32, 32), {"width": 0.125}),
       ("vgg11_bn", (3, 32, 32), {"width": 0.125}), ("wu_cnn", (1, 28, 28), {}),
       ("binary_vgg", (3, 8, 8), {"channels": (4, 8)})]


class _ResidualBN(nn.Module):
    """A residual block with BatchNorm and an in-place ReLU, as ResNets write it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.relu_(x + self.bn(self.conv(x))).flatten(1))


def _default_against_forward_ad(net, x, y, steps=2, autocast=False):
    """jvp="auto" (the default) and forward-mode AD take the same steps: parameters and buffers (BatchNorm's
    running statistics) agree, float64."""
    results = []
    for jvp in ("auto", "forward_ad"):
        model = copy.deepcopy(net)
        opt = CurveBall(model.parameters(), model=model, jvp=jvp)

        def forward():
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)
            return model(x)

        for _ in range(steps):
            torch.manual_seed(23)  # the same dropout masks for both
            opt.step(forward, CrossEntropy(y))
        results.append(_flat([*model.parameters(), *(b.double() for b in model.buffers())]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    return results[0]


@pytest.mark.medium
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name,shape,kwargs", ZOO, ids=[f"{n}{'-bn' if k.get('batchnorm') else ''}" for n, _, k in ZOO])
def test_every_zoo_model_steps_as_forward_mode_ad(name, shape, kwargs, mode):
    """ResNet-18 and a conv-BN-ReLU-Dropout net crashed ("modified by an inplace operation"): the extra pass over
    the same batch wrote BatchNorm's statistics back in place, into tensors the step's reverse graph had saved."""
    from backproplab.models import build_model

    torch.manual_seed(0)  # float64 (this module's default)
    net = build_model(name, shape, 10, **kwargs).train(mode == "train")
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    start = _flat(net.parameters())
    after = _default_against_forward_ad(net, x, y)
    assert not torch.equal(after[:len(start)], start)  # it did step


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                          nn.Linear(64, 3)),
    _ResidualBN,
], ids=["conv-bn-relu-dropout", "residual bn in-place relu"])
def test_batchnorm_residual_and_dropout_step_as_forward_mode_ad(make, mode):
    torch.manual_seed(0)
    net = make().train(mode == "train")
    _default_against_forward_ad(net, torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,)))


@pytest.mark.medium
def test_batchnorm_cnn_under_bf16_autocast_and_resnet_through_fit():
    from backproplab.data import load_dataset
    from backproplab.models import build_model
    from backproplab.train import TrainConfig, fit

    torch.manual_seed(0)  # float32, as autocast's users train
    net = build_model("cnn", (1, 8, 8), 10, batchnorm=True).float()
    _default_against_forward_ad(net, torch.randn(6, 1, 8, 8, dtype=torch.float32), torch.randint(0, 10, (6,)),
                                autocast=True)
    torch.manual_seed(0)
    data = load_dataset("digits", n_train=64)
    x = data.x_train.reshape(-1, 1, 8, 8).expand(-1, 3, -1, -1).contiguous()
    from backproplab.data import Data

    rgb = Data("digits-rgb", x, data.y_train, x[:16], data.y_train[:16], 10)
    model = build_model("resnet18", (3, 8, 8), 10, width=0.125).float()
    rows = fit(model, rgb, TrainConfig(optimizer="curveball", lr=0, momentum=0, batch_size=32, max_steps=4))
    assert math.isfinite(rows[-1]["train_loss"])

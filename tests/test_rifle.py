"""RIFLE's schedule and state handling, the regularizers' gradients and the baselines' mechanics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backproplab.data import load_dataset
from backproplab.methods import rifle
from backproplab.models import build_model
from backproplab.train import TrainConfig, fit, seed_everything


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", n_train=200)


@pytest.mark.parametrize("epochs,times,every,expected", [(8, 3, None, [2, 4, 6]), (10, 3, None, [2, 5, 8]),
                                                         (10, 1, None, [5]), (10, 0, 3, [3, 6]), (9, 0, 3, [3, 6])])
def test_reset_epochs_are_evenly_spaced_and_never_in_the_last_period(epochs, times, every, expected):
    assert rifle.reset_epochs(epochs, times, every) == expected


class _Spy:
    """Records head weights and optimizer state around every epoch start (runs before RIFLE)."""

    def __init__(self):
        self.before = {}

    def on_epoch_start(self, state):
        head = state.model.head
        self.before[state.epoch] = {
            "head": head.weight.detach().clone(),
            "rng": torch.get_rng_state(),
            "backbone_state": {id(p): {k: v.clone() for k, v in state.optimizer.state[p].items()}
                               for p in state.model.body.parameters() if p in state.optimizer.state},
        }


class _After:
    def __init__(self):
        self.after = {}

    def on_epoch_start(self, state):
        self.after[state.epoch] = {
            "head": state.model.head.weight.detach().clone(),
            "head_state": [state.optimizer.state.get(p, {}) for p in state.model.head.parameters()],
            "backbone_state": {id(p): {k: v.clone() for k, v in state.optimizer.state[p].items()}
                               for p in state.model.body.parameters() if p in state.optimizer.state},
        }


def test_resets_at_the_planned_steps_with_fresh_head_and_cleared_state(data):
    seed_everything(0)
    model = build_model("mlp", data.input_shape, 10, widths=(32,))
    spy, cb, after = _Spy(), rifle.RIFLE("head", times=3), _After()
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=50, epochs=8)
    fit(model, data, cfg, callbacks=[spy, cb, after])
    spe = 4
    assert cb.resets == [(2, 2 * spe), (4, 4 * spe), (6, 6 * spe)]
    for epoch, _ in cb.resets:
        b, a = spy.before[epoch], after.after[epoch]
        # freshly drawn: exactly what nn.Linear's own initialisation draws from the same RNG state
        torch.set_rng_state(b["rng"])
        fresh = nn.Linear(32, 10)
        assert torch.equal(a["head"], fresh.weight) and not torch.equal(a["head"], b["head"])
        assert all(len(s) == 0 for s in a["head_state"])
        assert a["backbone_state"].keys() == b["backbone_state"].keys() and b["backbone_state"]
        for k in b["backbone_state"]:
            assert all(torch.equal(a["backbone_state"][k][n], b["backbone_state"][k][n])
                       for n in b["backbone_state"][k])
    for epoch in set(range(8)) - {2, 4, 6}:
        if epoch in after.after and epoch in spy.before:
            assert torch.equal(after.after[epoch]["head"], spy.before[epoch]["head"])


def test_returned_model_has_the_trained_head(data):
    seed_everything(1)
    model = build_model("mlp", data.input_shape, 10, widths=(32,))
    cb = rifle.RIFLE("head", times=2)
    snapshots = {}

    class Last:
        def on_epoch_start(self, state):
            snapshots["last_reset_or_start"] = state.model.head.weight.detach().clone()

        def on_train_end(self, state):
            snapshots["end"] = state.model.head.weight.detach().clone()

    history = fit(model, data, TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=50, epochs=6),
                  callbacks=[cb, Last()])
    assert cb.resets[-1][0] < 6 - 1
    assert torch.equal(model.head.weight, snapshots["end"])  # nothing happens to the head after training
    assert not torch.equal(model.head.weight, snapshots["last_reset_or_start"])  # it was trained after the reset
    from backproplab.train import cross_entropy, evaluate

    trained = evaluate(model, data.x_test, data.y_test, cross_entropy)["acc"]
    assert math.isclose(trained, history[-1]["test_acc"])
    model.head.reset_parameters()  # what the authors' code returns: a random head
    assert evaluate(model, data.x_test, data.y_test, cross_entropy)["acc"] < trained - 0.1


def test_l2sp_gradient_is_analytic():
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, widths=(5,))
    reg = rifle.L2SP(model, "head", alpha=0.3, beta=0.07)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    grads = torch.autograd.grad(reg(model), list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        expected = 0.07 * p if n.startswith("head") else 0.3 * (p - start[n])
        torch.testing.assert_close(g, expected.detach())


def test_l2_value_and_gradient_are_the_closed_form():
    """(alpha/2) |w|^2 over every parameter: the value against a float64 sum, the gradient against alpha w."""
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, widths=(5,))
    value = rifle.L2(0.3)(model)
    expected = 0.15 * sum(p.detach().double().pow(2).sum() for p in model.parameters())
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
    for p, g in zip(model.parameters(), torch.autograd.grad(value, list(model.parameters()))):
        torch.testing.assert_close(g, 0.3 * p.detach())


def test_layer_grad_norms_are_each_layers_euclidean_norm():
    """Against a brute-force float64 loop over each named layer's parameters, element by element."""
    torch.manual_seed(0)
    model = build_model("resnet18", (1, 8, 8), 5, width=0.0625)
    F.cross_entropy(model(torch.randn(6, 1, 8, 8)), torch.arange(6) % 5).backward()
    names = ("stem", "layers.0", "layers.3", "head")
    got = rifle.layer_grad_norms(model, names)
    assert list(got) == list(names)
    for n in names:
        total = 0.0
        for p in rifle.get_submodule(model, n).parameters():
            for v in p.grad.double().reshape(-1).tolist():
                total += v * v
        assert math.isclose(got[n], math.sqrt(total), rel_tol=1e-5), n


def test_disturblabel_rate_matches_alpha():
    g = torch.Generator().manual_seed(0)
    n, alpha, classes = 200_000, 0.2, 10
    y = torch.randint(0, classes, (n,), generator=g)
    y2 = rifle.disturb_labels(y, alpha, classes, generator=g)
    rate = (y2 != y).double().mean().item()
    expected = alpha * (classes - 1) / classes  # resampled uniformly, so 1/C of resamples keep the label
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(rate - expected) < 4 * sigma
    # a resampled label is uniform over ALL classes: among examples of true class 0, the disturbed labels
    # are class 0 with probability 1 - alpha + alpha/C and each other class with alpha/C (chi-square test)
    from scipy.stats import chisquare

    labels = y2[y == 0]
    counts = torch.bincount(labels, minlength=classes).double().numpy()
    expected = [1 - alpha + alpha / classes] + [alpha / classes] * (classes - 1)
    assert chisquare(counts, [e * len(labels) for e in expected]).pvalue > 1e-3
    skewed = torch.where(y2 == 9, torch.full_like(y2, 8), y2)[y == 0]  # a sampler that never picks class 9
    skewed_counts = torch.bincount(skewed, minlength=classes).double().numpy()
    assert chisquare(skewed_counts, [e * len(labels) for e in expected]).pvalue < 1e-6


def test_dropconnect_masks_weights_not_activations():
    torch.manual_seed(0)
    layer = rifle.DropConnectLinear(nn.Linear(6, 4), p=0.5)
    x = torch.randn(3, 6)
    out = layer(x)
    mask = layer.last_mask
    assert mask.shape == layer.linear.weight.shape
    torch.testing.assert_close(out, F.linear(x, layer.linear.weight * mask / 0.5, layer.linear.bias))
    assert 0.3 < mask.mean() < 0.7  # about half the weights dropped, each independently
    layer.eval()
    torch.testing.assert_close(layer(x), layer.linear(x))


class _LrRecorder:
    def __init__(self):
        self.per_epoch = []

    def on_step_end(self, state):
        if (state.step - 1) % state.steps_per_epoch == 0:  # the first step of each epoch
            self.per_epoch.append([g["lr"] for g in state.optimizer.param_groups])


def _cosine(base, t):
    return 0.5 * base * (1 + math.cos(math.pi * t))


def test_cyclic_lr_restarts_at_the_rifle_boundaries(data):
    """The authors' per-epoch cosine, restarting at the RIFLE period starts, written out by hand."""
    seed_everything(0)
    model = build_model("mlp", data.input_shape, 10, widths=(16,))
    rec = _LrRecorder()
    fit(model, data, TrainConfig(optimizer="sgd", lr=0.1, batch_size=50, epochs=8),
        callbacks=[rifle.CyclicLR(times=3), rec])
    # periods [0, 2), [2, 4), [4, 6), [6, 8): t = 0, 1/2 in each
    assert [lr for (lr,) in rec.per_epoch] == pytest.approx([_cosine(0.1, t) for t in [0, 0.5] * 4], abs=1e-15)


def test_cosine_lr_anneals_the_backbone_over_the_run_and_restarts_only_the_head(data):
    """The authors' train.py: lr_cnn = cos over all E epochs, lr_fc restarting every E / (K + 1) epochs."""
    seed_everything(0)
    model = build_model("mlp", data.input_shape, 10, widths=(16,))
    groups = rifle.head_param_groups(model, "head")
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.head.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    rec = _LrRecorder()
    fit(model, data, TrainConfig(optimizer="sgd", lr=0.01, batch_size=50, epochs=12), optimizer=opt,
        callbacks=[rifle.RIFLE("head", times=2), rifle.CosineLR(times=2, restart=[0]), rec])
    head, body = zip(*rec.per_epoch)
    assert body == pytest.approx([_cosine(0.01, e / 12) for e in range(12)], abs=1e-15)
    assert head == pytest.approx([_cosine(0.01, (e % 4) / 4) for e in range(12)], abs=1e-15)
    assert body[-1] < 0.001 and head[-1] < 0.002  # both end annealed


def test_gradient_monitor_records_each_layers_gradient_at_every_step(data):
    """Against gradients taken independently with torch.autograd.grad on the same batches and weights."""
    from backproplab.experiments.rifle import GradNormMonitor

    seed_everything(0)
    model = build_model("mlp", data.input_shape, 10, widths=(16, 12))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    expected = {n: [] for n in names}

    def step(batch, state):  # a plain step that also computes each layer's gradient norm on its own
        loss = F.cross_entropy(state.model(batch.x), batch.y)
        for n in names:
            params = list(model.get_submodule(n).parameters())
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            expected[n].append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        return loss.detach()

    monitor = GradNormMonitor(tuple(names))
    history = fit(model, data, TrainConfig(optimizer="sgd", lr=0.1, batch_size=50, epochs=3), step=step,
                  callbacks=[monitor])
    for n in names:
        assert monitor.norms[n] == pytest.approx(expected[n], rel=1e-5)
        per_epoch = [sum(expected[n][4 * e:4 * e + 4]) / 4 for e in range(3)]  # 4 steps an epoch
        assert [row[f"grad_norm_{n}"] for row in history] == pytest.approx(per_epoch, rel=1e-5)
    windows = monitor.windows([0, 5, 12])
    assert windows[names[0]] == pytest.approx([sum(expected[names[0]][:5]) / 5, sum(expected[names[0]][5:]) / 7],
                                              rel=1e-5)


def test_direction_change_is_one_minus_the_cosine_of_the_flattened_weights():
    torch.manual_seed(0)
    a, b = build_model("mlp", (6,), 3, widths=(5,)), build_model("mlp", (6,), 3, widths=(5,))
    got = rifle.direction_change(a, b, ["head"])["head"]
    w = torch.cat([a.head.weight.flatten(), a.head.bias]).double().detach()
    w0 = torch.cat([b.head.weight.flatten(), b.head.bias]).double().detach()
    assert got == pytest.approx(1 - float(w @ w0) / float(w.norm() * w0.norm()), abs=1e-12)
    with torch.no_grad():
        a.head.weight.copy_(b.head.weight * 0.3)
        a.head.bias.copy_(b.head.bias * 0.3)
    assert rifle.direction_change(a, b, ["head"])["head"] == pytest.approx(0, abs=1e-12)  # shrinking is no turn


def test_stochastic_depth_needs_residual_blocks_and_drops_branches():
    with pytest.raises(ValueError, match="residual blocks"):
        rifle.with_stochastic_depth(build_model("mlp", (4,), 2))
    torch.manual_seed(0)
    model = rifle.with_stochastic_depth(build_model("resnet18", (1, 8, 8), 3, width=0.125), p_last=1.0)
    blocks = [m for m in model.modules() if isinstance(m, rifle.StochasticDepthBlock)]
    assert len(blocks) == 8 and blocks[-1].p == 1.0
    last = blocks[-1]
    x = torch.randn(2, last.block.conv1.in_channels, 1, 1)
    last.train()
    torch.testing.assert_close(last(x), last.block.act2(last.block.shortcut(x)))  # p = 1: branch always dropped


@pytest.mark.medium
def test_rifle_schedule_in_a_plain_loop_equals_the_fit_callback(data):
    """A hand-written loop with RIFLESchedule.step() gives the weights fit with the RIFLE callback gives."""
    from backproplab.train import epoch_order

    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=50, epochs=8, seed=4)
    seed_everything(0)
    expected = build_model("mlp", data.input_shape, 10, widths=(32,))
    callback = rifle.RIFLE("head", times=3)
    fit(expected, data, cfg, callbacks=[callback])

    seed_everything(0)
    model = build_model("mlp", data.input_shape, 10, widths=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = rifle.RIFLESchedule(model.head, opt, total_steps=8 * 4, times=3)
    for epoch in range(8):
        order = epoch_order(len(data.x_train), epoch, 4)
        for s in range(0, len(order), 50):
            idx = order[s:s + 50]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            schedule.step()
    assert schedule.resets == [8, 16, 24] == [step for _, step in callback.resets]
    for a, b in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reinit_head_redraws_the_head_and_clears_only_its_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.Adam(model.parameters())
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    backbone_state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    old = model[2].weight.detach().clone()
    rng = torch.get_rng_state()
    head = rifle.reinit_head(model, opt, head="2")
    torch.set_rng_state(rng)
    assert head is model[2] and torch.equal(model[2].weight, nn.Linear(6, 3).weight)
    assert not torch.equal(model[2].weight, old)
    assert model[2].weight not in opt.state and model[2].bias not in opt.state
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in backbone_state.items())


def test_rifle_callback_without_on_train_start_raises(data):
    cb = rifle.RIFLE("head", times=2)
    with pytest.raises(RuntimeError, match="before on_train_start"):
        cb.on_epoch_start(object())


@pytest.mark.medium
def test_stochastic_depth_drops_at_its_rate_and_scales_at_test_time():
    """In training the branch survives with probability 1 - p (binomial test over forward passes); at test
    time it is always kept and multiplied by 1 - p, the expectation of the training-time mask."""
    from scipy.stats import binomtest

    torch.manual_seed(1)
    model = rifle.with_stochastic_depth(build_model("resnet18", (1, 8, 8), 3, width=0.125), p_last=0.5)
    block = [m for m in model.modules() if isinstance(m, rifle.StochasticDepthBlock)][-1]
    b = block.block
    x = torch.randn(2, b.conv1.in_channels, 2, 2)
    with torch.no_grad():
        block.eval()
        b.eval()
        branch = b.bn2(b.conv2(b.act1(b.bn1(b.conv1(x)))))
        torch.testing.assert_close(block(x), b.act2((1 - block.p) * branch + b.shortcut(x)))
        block.train()
        b.eval()  # BatchNorm with fixed statistics, so that kept and dropped outputs are exactly comparable
        kept_out, dropped_out = b.act2(branch + b.shortcut(x)), b.act2(b.shortcut(x))
        kept = 0
        trials = 2000
        for _ in range(trials):
            out = block(x)
            if torch.allclose(out, kept_out):
                kept += 1
            else:
                torch.testing.assert_close(out, dropped_out)
    assert binomtest(kept, trials, 1 - block.p).pvalue > 1e-3
    assert abs(kept / trials - (1 - block.p)) < 0.05

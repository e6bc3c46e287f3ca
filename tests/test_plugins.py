"""Every step and callback the lab ships, through the one loop: the same seed gives the same metrics, and a
run that crashes after a checkpoint and resumes ends with the metrics of an uninterrupted run."""

import copy
import dataclasses
import json
import sys

import pytest
import torch

from backproplab import msgd, privacy, rifle, robustness, stobatch
from backproplab.data import load_dataset
from backproplab.models import build_model
from backproplab.train import TIMING_KEYS, StepDecay, TrainConfig, epoch_order, fit, loss_step, seed_everything

# runs experiments, the CLI or a local server: not in the fast tier (make test-fast)
pytestmark = pytest.mark.medium

EPOCHS, N = 3, 96


class Crash(Exception):
    pass


class CrashAt:
    """Raises at a given step: a crash after the loop has checkpointed."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            raise Crash


def _data(unit_range=False):
    return load_dataset("digits", n_train=N, seed=0, unit_range=unit_range)


def _mlp(data):
    return build_model("mlp", data.input_shape, data.num_classes, widths=(16,))


def standard(cfg):
    data = _data()
    return _mlp(data), data, cfg, {}


def curveball(cfg):
    data = _data()
    cfg.optimizer, cfg.lr, cfg.momentum = "curveball", 0.0, 0.0
    return _mlp(data), data, cfg, {}


def momentum_step_decay(cfg):
    data = _data()
    cfg.momentum = 0.9
    return _mlp(data), data, cfg, {"callbacks": [StepDecay(every=1, factor=0.5)]}


def msgd_weighted(cfg):
    data = _data()
    cfg.optimizer, cfg.max_steps = "gd", 9
    return _mlp(data), data, cfg, {"step": msgd.weighted_gradient_step(msgd.MSGDCov(N, 16))}


def gld(cfg):
    data = _data()
    cfg.optimizer, cfg.max_steps = "gd", 9
    noise = msgd.GLD(N, 16, every=4)
    return _mlp(data), data, cfg, {"step": noise.training_step(), "callbacks": [noise]}


def rifle_l2sp_disturb(cfg):
    data = _data()
    model = _mlp(data)
    penalty = rifle.L2SP(model, "head", alpha=0.1, beta=0.01)
    return model, data, cfg, {"step": rifle.penalized_step(penalty, 0.2, data.num_classes),
                              "callbacks": [rifle.RIFLE("head", times=2)]}


def cyclic_lr(cfg):
    data = _data()
    cfg.momentum = 0.9
    return _mlp(data), data, cfg, {"callbacks": [rifle.CyclicLR(times=2)]}


def adversarial(cfg):
    data = _data()
    terms = robustness.adversarial_loss(robustness.pgd, 1.0, eps=0.1, steps=2)
    return _mlp(data), data, cfg, {"step": loss_step(lambda b, s: terms(s.model, b.x, b.y))}


def dp_sgd(cfg, engine="ghost"):
    data = _data()
    model = privacy.prepare_model(_mlp(data))
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=cfg.lr), N, cfg.batch_size,
                       privacy.planned_steps(cfg, N),
                       privacy.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, engine=engine))
    return dp.model, data, cfg, {"optimizer": dp.optimizer, "step": dp.step(), "callbacks": [dp]}


def dp_sgd_opacus(cfg):
    return dp_sgd(cfg, engine="opacus")


def stobatch_step(cfg):
    data = _data(unit_range=True)
    model = stobatch.StoBatchNet(data.input_shape, data.num_classes, norm="group")
    cfg.optimizer, cfg.lr, cfg.batch_size = "adam", 1e-3, 32
    sto = stobatch.StoBatch(model, N, stobatch.StoBatchConfig(eps2=1.0, eps3=1.0, batch=16, workers=2, seed=0,
                                                              steps=privacy.planned_steps(cfg, N)))
    return model, data, cfg, {"step": sto.step(data.num_classes), "callbacks": [sto]}


CASES = [standard, curveball, momentum_step_decay, msgd_weighted, gld, rifle_l2sp_disturb, cyclic_lr, adversarial,
         dp_sgd, dp_sgd_opacus, stobatch_step]


def _run(case, out_dir=None, crash_at=None):
    seed_everything(0)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=16, epochs=EPOCHS, eval_every=2, checkpoint_every=2,
                      seed=0, device="cpu")
    model, data, cfg, kwargs = case(cfg)
    callbacks = list(kwargs.pop("callbacks", [])) + ([CrashAt(crash_at)] if crash_at else [])
    history = fit(model, data, cfg, callbacks=callbacks, out_dir=out_dir, **kwargs)
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_same_seed_same_metrics_and_crash_then_resume_equals_uninterrupted(case, tmp_path):
    first = _run(case)
    assert first == _run(case), "the same seed must give the same metrics"
    with pytest.raises(Crash):
        _run(case, tmp_path, crash_at=5)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = _run(case, tmp_path)
    assert resumed == first
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows] == first


def cosine_lr(cfg):
    data = _data()
    return _mlp(data), data, cfg, {"callbacks": [rifle.CosineLR(times=0)]}


@pytest.mark.parametrize("case", [momentum_step_decay, cosine_lr], ids=["step_decay", "cosine_lr"])
def test_a_schedule_resumed_mid_epoch_keeps_that_epochs_learning_rate(case, tmp_path):
    """Checkpoint at step 8, inside epoch 1 (6 steps per epoch), where the schedule has already moved: the
    resumed run ends as the uninterrupted one (torch's schedulers, rebuilt on resume, start at epoch 0's rate)."""
    first = _run(case)
    with pytest.raises(Crash):
        _run(case, tmp_path, crash_at=9)
    assert _run(case, tmp_path) == first


# ---------------------------------------------------------------- float64 gradient checks of the shared steps
# One step of each deterministic case (and of those whose random draw can be recorded) in float64, against the
# gradient computed independently, example by example, from what the step is meant to minimise: the update of
# plain SGD's first step is -lr g (momentum's buffer starts at g). The other shipped steps have their own float64
# references: CurveBall's GGN product against explicit Jacobians (test_curveball), DP-SGD's clipped sums against a
# micro-batch loop (test_privacy), GLD's noise against the SGD noise trace and MSGD's G w (test_msgd), StoBatch's
# objective written out with loops (test_stobatch).


def _data64(unit_range=False):
    data = load_dataset("digits", n_train=N, seed=0, unit_range=unit_range)
    return dataclasses.replace(data, x_train=data.x_train.double(), x_test=data.x_test.double())


class _LearningRate:
    """Records the learning rate the first step used."""

    lr = None

    def on_step_end(self, state):
        if self.lr is None:
            self.lr = state.optimizer.param_groups[0]["lr"]


def _first_step_gradient(case, monkeypatch):
    """(model's first-step gradient recovered from its update, the model before the step, the first batch)."""
    monkeypatch.setattr(sys.modules[__name__], "_data", _data64)
    seed_everything(0)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=16, epochs=1, seed=0, device="cpu")
    torch.set_default_dtype(torch.float64)  # the case builds its model in float64
    try:
        model, data, cfg, kwargs = case(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    cfg.max_steps = 1
    before = copy.deepcopy(model)
    lr = _LearningRate()
    fit(model, data, cfg, callbacks=[*kwargs.pop("callbacks", []), lr], **kwargs)
    moved = [(p0.detach() - p1.detach()) / lr.lr for p0, p1 in zip(before.parameters(), model.parameters())]
    batch = epoch_order(N, 0, 0)[:16]
    return moved, before, data, batch


def _example_gradients(model, x, y):
    """Per-example gradients of the cross-entropy, one backward pass per example (the slow, obvious way)."""
    out = []
    for i in range(len(x)):
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        out.append(torch.autograd.grad(loss, list(model.parameters())))
    return out


def _weighted_sum(grads, weights):
    return [sum(w * g[j] for w, g in zip(weights, grads)) for j in range(len(grads[0]))]


@pytest.mark.parametrize("case", [standard, momentum_step_decay, cyclic_lr], ids=lambda c: c.__name__)
def test_a_plain_steps_update_is_the_mean_example_gradient_in_float64(case, monkeypatch):
    moved, before, data, batch = _first_step_gradient(case, monkeypatch)
    assert moved[0].dtype == torch.float64
    grads = _example_gradients(before, data.x_train[batch], data.y_train[batch])
    for got, want in zip(moved, _weighted_sum(grads, [1 / 16] * 16)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_msgd_weighted_steps_update_is_the_drawn_weighting_of_example_gradients_in_float64(monkeypatch):
    drawn = []
    sample = msgd.MSGDCov.sample

    def recording(self, *args, **kwargs):
        drawn.append(sample(self, *args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(msgd.MSGDCov, "sample", recording)
    moved, before, data, _ = _first_step_gradient(msgd_weighted, monkeypatch)
    (idx, weights), = drawn
    grads = _example_gradients(before, data.x_train[idx], data.y_train[idx])
    for got, want in zip(moved, _weighted_sum(grads, weights.double())):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_rifle_penalized_steps_update_is_disturbed_labels_gradient_plus_l2sp_in_float64(monkeypatch):
    labels = []
    disturb = rifle.disturb_labels

    def recording(*args, **kwargs):
        labels.append(disturb(*args, **kwargs))
        return labels[-1]

    monkeypatch.setattr(rifle, "disturb_labels", recording)
    moved, before, data, batch = _first_step_gradient(rifle_l2sp_disturb, monkeypatch)
    y_used, = labels
    assert (y_used != data.y_train[batch]).any()  # DisturbLabel changed some labels in this batch
    grads = _weighted_sum(_example_gradients(before, data.x_train[batch], y_used), [1 / 16] * 16)
    # L2-SP at the pretrained point: alpha (w - w0) = 0 outside the head, beta w on the head
    head = {id(p) for p in before.head.parameters()}
    for got, g, p in zip(moved, grads, before.parameters()):
        torch.testing.assert_close(got, g + (0.01 * p.detach() if id(p) in head else 0), rtol=1e-9, atol=1e-12)

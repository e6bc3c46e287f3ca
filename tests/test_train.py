"""The loop against hand-written references: a bare loop, exact resume, determinism, chunked GD."""

import math

import pytest
import torch
import torch.nn.functional as F

from backproplab import _io
from backproplab.data import load_dataset
from backproplab.models import build_model
from backproplab.train import TIMING_KEYS, NonFiniteLossError, TrainConfig, fit, seed_everything


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", n_train=256)


def _model(data, seed=0, name="mlp", **kw):
    seed_everything(seed)
    return build_model(name, data.input_shape, data.num_classes, **kw)


def _deterministic(history):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def test_loop_equals_a_bare_hand_written_loop(digits):
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=48, epochs=2, seed=5)
    model = _model(digits)
    reference = _model(digits)
    fit(model, digits, cfg)

    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    n = len(digits.x_train)
    for epoch in range(2):
        g = torch.Generator().manual_seed(5 + epoch)  # DistributedSampler's documented shuffling
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 48):
            idx = perm[s:s + 48]
            opt.zero_grad()
            F.cross_entropy(reference(digits.x_train[idx]), digits.y_train[idx]).backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_same_seed_same_metrics_different_seed_different(digits):
    cfg = TrainConfig(optimizer="adam", lr=1e-3, batch_size=32, epochs=2, seed=1)
    runs = [_deterministic(fit(_model(digits, s), digits, TrainConfig(**{**cfg.__dict__, "seed": s})))
            for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_resume_after_a_crash_gives_the_uninterrupted_metrics(tmp_path, digits, model_name):
    """Crash mid-epoch between two checkpoints, resume from the last one: same final weights and metrics."""
    kw = {"batchnorm": True} if model_name == "cnn" else {}
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=32, epochs=3, checkpoint_every=5,
                      eval_every=7, seed=3)
    full = fit(_model(digits, 0, model_name, **kw), digits, cfg, out_dir=tmp_path / "full")

    class Crash:
        def on_step_end(self, state):
            if state.step == 13:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(digits, 0, model_name, **kw), digits, cfg, out_dir=tmp_path / "cut", callbacks=[Crash()])
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "final.json").exists()
    torch.manual_seed(1234)  # the resumed run must not depend on the global RNG state at restart
    resumed = fit(_model(digits, 99, model_name, **kw), digits, cfg, out_dir=tmp_path / "cut")
    assert _deterministic(resumed) == _deterministic(full)
    assert _deterministic(_io.read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == _deterministic(full)
    a, b = torch.load(tmp_path / "full" / "model.pt"), torch.load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dropout_rng_is_restored_on_resume(tmp_path, digits):
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=32, epochs=2, checkpoint_every=4, seed=0)

    def model(seed):
        seed_everything(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))

    full = fit(model(0), digits, cfg, out_dir=tmp_path / "a")

    class Crash:
        def on_step_end(self, state):
            if state.step == 10:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fit(model(0), digits, cfg, out_dir=tmp_path / "b", callbacks=[Crash()])
    resumed = fit(model(0), digits, cfg, out_dir=tmp_path / "b")
    assert _deterministic(resumed) == _deterministic(full)


def test_full_batch_gd_chunks_add_up_to_the_full_gradient(digits):
    """optimizer=gd with chunk_size smaller than n takes exactly the full-batch gradient step."""
    model, reference = _model(digits), _model(digits)
    fit(model, digits, TrainConfig(optimizer="gd", lr=0.5, epochs=1, chunk_size=100, seed=0))
    loss = F.cross_entropy(reference(digits.x_train), digits.y_train)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, q, g in zip(model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p, q - 0.5 * g, rtol=1e-5, atol=1e-6)


def test_step_budget_and_eval_schedule(digits):
    history = fit(_model(digits), digits, TrainConfig(batch_size=32, max_steps=20, eval_every=6))
    assert [row["step"] for row in history] == [6, 12, 18, 20]
    assert math.isclose(history[-1]["epoch"], 20 / 8)


def test_non_finite_loss_raises_a_clear_error(digits):
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        fit(_model(digits), digits, TrainConfig(optimizer="sgd", lr=1e12, batch_size=32, epochs=3))


def test_callbacks_see_every_event_in_order(digits):
    events = []

    class Spy:
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda state: events.append((name, state.step))
            raise AttributeError(name)

    fit(_model(digits), digits, TrainConfig(batch_size=128, epochs=2), callbacks=[Spy()])
    names = [e for e, _ in events]
    assert names == ["on_train_start", "on_epoch_start", "on_step_end", "on_step_end", "on_eval", "on_epoch_end",
                     "on_epoch_start", "on_step_end", "on_step_end", "on_eval", "on_epoch_end", "on_train_end"]


def test_custom_step_plugs_in(digits):
    """A step that takes per-example losses (what MSGD's weighting needs) sees the batch's indices."""
    seen = []

    def weighted_step(batch, state):
        seen.append(batch.index.clone())
        state.optimizer.zero_grad()
        per_example = state.loss_fn(state.net(batch.x), batch.y, reduction="none")
        loss = per_example.mean()
        loss.backward()
        state.optimizer.step()
        return loss.detach()

    fit(_model(digits), digits, TrainConfig(batch_size=64, epochs=1), step=weighted_step)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(digits.x_train)))


@pytest.mark.parametrize("n,world,shuffle", [(10, 1, True), (10, 3, True), (7, 2, False), (2, 3, True), (64, 2, True)])
def test_epoch_order_is_torch_distributed_sampler(n, world, shuffle):
    from torch.utils.data import DistributedSampler

    from backproplab.train import epoch_order

    for rank in range(world):
        for epoch in range(3):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=7)
            sampler.set_epoch(epoch)
            assert epoch_order(n, epoch, 7, rank, world, shuffle).tolist() == list(sampler)

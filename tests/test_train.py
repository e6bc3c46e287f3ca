"""The loop against hand-written references: a bare loop, exact resume, determinism, chunked GD."""

import math

import pytest
import torch
import torch.nn.functional as F

from backproplab import _io
from backproplab.data import load_dataset
from backproplab.models import build_model
from backproplab.streams import derive_seed
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
        # DistributedSampler's documented shuffling, from the run's epoch-order stream
        g = torch.Generator().manual_seed(derive_seed(5, "epoch-order") + epoch)
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 48):
            idx = perm[s:s + 48]
            opt.zero_grad()
            F.cross_entropy(reference(digits.x_train[idx]), digits.y_train[idx]).backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.medium
def test_same_seed_same_metrics_different_seed_different(digits):
    cfg = TrainConfig(optimizer="adam", lr=1e-3, batch_size=32, epochs=2, seed=1)
    runs = [_deterministic(fit(_model(digits, s), digits, TrainConfig(**{**cfg.__dict__, "seed": s})))
            for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.medium
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


def test_each_rows_training_loss_is_the_mean_of_the_steps_since_the_last_row(digits):
    """Against the step losses themselves, recorded as the steps return them: rows at steps 6, 12, 18, 20 hold the
    mean over steps 1-6, 7-12, 13-18 and 19-20 (not a running mean), and each row's test metrics are evaluate's."""
    from backproplab.train import cross_entropy, evaluate, standard_step

    losses, tests = [], []

    def recording_step(batch, state):
        loss = standard_step(batch, state)
        losses.append(float(loss))
        return loss

    class TestSpy:
        def on_eval(self, state):
            tests.append(evaluate(state.model, digits.x_test, digits.y_test, cross_entropy)["loss"])

    history = fit(_model(digits), digits, TrainConfig(batch_size=32, max_steps=20, eval_every=6),
                  step=recording_step, callbacks=[TestSpy()])
    bounds = [0, 6, 12, 18, 20]
    for row, a, b, test_loss in zip(history, bounds, bounds[1:], tests):
        assert math.isclose(row["train_loss"], sum(losses[a:b]) / (b - a), rel_tol=1e-5), row["step"]
        assert math.isclose(row["test_loss"], test_loss, rel_tol=1e-6)


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
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                         seed=derive_seed(7, "epoch-order"))
            sampler.set_epoch(epoch)
            assert epoch_order(n, epoch, 7, rank, world, shuffle).tolist() == list(sampler)


def test_no_two_seeds_share_an_epochs_order():
    """#36: with ``seed + epoch`` seed k's second epoch was shuffled like seed k + 1's first. Over 20 seeds and
    5 epochs of 50 examples, the 100 orders are distinct (two equal permutations of 50 by chance: about
    100^2 / 2 / 50!, i.e. never)."""
    from backproplab.train import epoch_order

    orders = {tuple(epoch_order(50, epoch, seed).tolist()) for seed in range(20) for epoch in range(5)}
    assert len(orders) == 100


class _EpochOrderSampler(torch.utils.data.Sampler):
    """A user's sampler with set_epoch, yielding the loop's own documented order (see epoch_order)."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        from backproplab.train import epoch_order

        return iter(epoch_order(self.n, self.epoch, self.seed).tolist())

    def __len__(self):
        return self.n


def _loaders(data, batch_size, seed):
    from torch.utils.data import DataLoader, TensorDataset

    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size,
                       sampler=_EpochOrderSampler(len(data.x_train), seed))
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=100)
    return train, test


def test_fit_over_a_dataloader_equals_fit_over_in_memory_data(digits):
    """A DataLoader giving the same batches in the same order gives the same metrics, evaluation included."""
    cfg = TrainConfig(lr=0.1, momentum=0.9, batch_size=48, epochs=2, seed=3)
    expected = fit(_model(digits), digits, cfg)
    train, test = _loaders(digits, 48, 3)
    got = fit(_model(digits), train, cfg, eval_data=test)
    assert len(got) == len(expected) == 2
    for a, b in zip(_deterministic(got), _deterministic(expected)):
        assert a.keys() == b.keys()
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), k


@pytest.mark.medium
def test_fit_over_an_iterable_without_length_and_a_resumed_dataloader(tmp_path, digits):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for s in range(0, 96, 32):
                yield digits.x_train[s:s + 32], digits.y_train[s:s + 32]

    history = fit(_model(digits), Stream(), TrainConfig(lr=0.1, max_steps=6))
    assert [r["step"] for r in history] == [3, 6] and "test_loss" not in history[0]  # epochs end with the stream
    assert fit(_model(digits), Stream(), TrainConfig(lr=0.1, max_steps=4, eval_every=2))[-1]["step"] == 4

    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield digits.x_train[:8], digits.y_train[:8]

    with pytest.raises(ValueError, match="has no length.*set max_steps"):  # fails fast instead of never ending
        fit(_model(digits), Endless(), TrainConfig(lr=0.1, epochs=1))
    assert fit(_model(digits), Endless(), TrainConfig(lr=0.1, max_steps=5))[-1]["step"] == 5

    cfg = TrainConfig(lr=0.1, batch_size=32, epochs=2, seed=1, checkpoint_every=3, eval_every=2)
    train, test = _loaders(digits, 32, 1)
    reference = fit(_model(digits), train, cfg, eval_data=test)

    class Crash:
        def on_step_end(self, state):
            if state.step == 11:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(digits), train, cfg, eval_data=test, out_dir=tmp_path, callbacks=[Crash()])
    resumed = fit(_model(digits, seed=9), train, cfg, eval_data=test, out_dir=tmp_path)
    assert _deterministic(resumed) == _deterministic(reference)
    assert _deterministic(_io.read_jsonl(tmp_path / "metrics.jsonl")) == _deterministic(reference)


def test_fit_refuses_an_iterator_and_an_empty_iterable(digits):
    with pytest.raises(TypeError, match="iterator"):
        fit(_model(digits), iter([(digits.x_train[:8], digits.y_train[:8])]), TrainConfig())
    with pytest.raises(ValueError, match="no batches"):
        fit(_model(digits), [], TrainConfig())
    with pytest.raises(TypeError, match=r"pair of tensors \(x, y\)"):
        fit(_model(digits), [digits.x_train[:8]], TrainConfig())


def test_fit_trains_where_the_model_is_unless_told():
    from backproplab.train import fit_device

    assert TrainConfig().device == "model"
    model = torch.nn.Linear(3, 2, device="meta")  # a model on another device than the CPU stays there
    assert fit_device("model", model) == torch.device("meta")
    assert fit_device("cpu", model) == torch.device("cpu")
    assert fit_device("model", torch.nn.ReLU()) == torch.device("cpu")


def test_progress_prints_one_line_per_evaluation(digits, capsys):
    fit(_model(digits), digits, TrainConfig(lr=0.1, epochs=3), progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 3 and "test_acc" in lines[-1] and "step 12/12" in lines[-1]
    fit(_model(digits), digits, TrainConfig(lr=0.1, epochs=1))  # stderr is not a terminal here: silent
    assert capsys.readouterr().err == ""


def test_progress_lines_name_the_run_and_go_above_a_progress_bar(digits, capsys, tmp_path, monkeypatch):
    """An experiment's evaluation line names its arm and seed (the run folder) and is written by tqdm.write,
    which clears and redraws any open bar instead of printing over it."""
    import tqdm

    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    fit(_model(digits), digits, TrainConfig(lr=0.1, epochs=1), progress=True, out_dir=tmp_path / "sgd-lr0.1" / "seed3")
    assert len(written) == 1 and written[0].startswith("sgd-lr0.1 seed3: epoch 1.00")


def test_metrics_file_is_appended_per_evaluation(tmp_path, digits):
    """Each evaluation adds a line to the same file (not a rewrite of the whole history)."""
    import os

    path, seen = tmp_path / "metrics.jsonl", []

    class Watch:
        def on_eval(self, state):
            if path.exists():
                seen.append((os.stat(path).st_ino, len(_io.read_jsonl(path)), len(state.history)))

    fit(_model(digits), digits, TrainConfig(lr=0.1, epochs=4), out_dir=tmp_path, callbacks=[Watch()])
    assert len({ino for ino, _, _ in seen}) == 1
    assert [rows for _, rows, _ in seen] == [h - 1 for _, _, h in seen] == [0, 1, 2, 3]
    assert len(_io.read_jsonl(path)) == 4


def test_a_line_cut_short_by_a_crash_is_left_out(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert _io.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError):
        _io.read_jsonl(path)


def test_every_bounded_train_config_field_is_checked_from_its_declaration():
    """#36 item 4: TrainConfig's limits live on its fields (``fields.option``) and ``check_config`` reads them:
    every numeric field with a lower bound refuses the value just below it (and NaN for a float), naming the
    field; the fields declared without one (batch_size <= 0 means the whole set; any int is a seed) take it."""
    import dataclasses

    from backproplab.train import check_config

    bounded = [f for f in dataclasses.fields(TrainConfig)
               if f.metadata.get("ge") is not None and type(f.default) in (int, float)]
    assert {f.name for f in bounded} >= {"lr", "momentum", "weight_decay", "epochs", "max_steps", "eval_every",
                                         "checkpoint_every", "chunk_size", "eval_batch_size", "finite_check_every"}
    for f in bounded:
        below = f.metadata["ge"] - (0.5 if isinstance(f.default, float) else 1)
        for bad in ([below, float("nan")] if isinstance(f.default, float) else [below]):
            with pytest.raises(ValueError, match=rf"TrainConfig\.{f.name}="):
                check_config(TrainConfig(**{f.name: bad}))
        check_config(TrainConfig(**{f.name: f.metadata["ge"]}))  # the bound itself is allowed
    check_config(TrainConfig(batch_size=-1, seed=-5))
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))

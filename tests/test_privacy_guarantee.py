"""DP-SGD refuses every model, loop and setting that would void its guarantee, and releases nothing private
unaccounted. Each refusal test ran (and failed: accepted, or failed with an unrelated error) on the code before
these checks; the adjacency test bounds the clipped sum's sensitivity on every model the engines accept."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from backproplab.data import Data
from backproplab.methods import privacy
from backproplab.methods.privacy import PrivacyError
from backproplab.models import build_model
from backproplab.train import Batch, TrainConfig, fit

pytest.importorskip("opacus")


def _data(n=24, shape=(5,), classes=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)
    return Data("toy", x, y, x, y, classes)


def _dpsgd(model, n=24, batch_size=8, engine="ghost", noise=1.0, clip=1.0, lr=0.1, **kwargs):
    return privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), n=n, batch_size=batch_size, steps=4,
                         config=privacy.DPConfig(noise_multiplier=noise, max_grad_norm=clip, engine=engine), **kwargs)


def _fit(dp, data, steps=2, batch_size=8, **kwargs):
    return fit(dp.model, data, TrainConfig(optimizer="sgd", lr=0.1, batch_size=batch_size, max_steps=steps),
               optimizer=dp.optimizer, step=dp.step(), callbacks=[dp], **kwargs)


def _frozen_bn():
    bn = nn.BatchNorm1d(4)
    bn.requires_grad_(False)
    return bn


def _eval_bn():
    bn = nn.BatchNorm1d(4)
    bn.requires_grad_(False)
    return bn.eval()


class _Unsqueeze(nn.Module):
    def forward(self, x):
        return x.unsqueeze(-1).expand(-1, -1, 3)


# ---------------------------------------------------------------- layers that mix examples: refused when built

REFUSED_LAYERS = {
    "batchnorm affine=False": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), nn.ReLU(),
                                                     nn.Linear(4, 3)), "BatchNorm mixes"),
    "batchnorm frozen": (lambda: nn.Sequential(nn.Linear(5, 4), _frozen_bn(), nn.Linear(4, 3)), "BatchNorm mixes"),
    "batchnorm frozen eval": (lambda: nn.Sequential(nn.Linear(5, 4), _eval_bn(), nn.Linear(4, 3)), "BatchNorm mixes"),
    "batchnorm trainable": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
                            "BatchNorm mixes"),
    "instancenorm running stats": (lambda: nn.Sequential(nn.Linear(5, 4), _Unsqueeze(),
                                                         nn.InstanceNorm1d(4, track_running_stats=True), nn.Flatten(),
                                                         nn.Linear(12, 3)), "track_running_stats=True"),
    "embedding max_norm": (lambda: nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(8, 3)),
                           r"max_norm=1\.0\) renormalises"),
    "weight_norm": (lambda: nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(5, 4)), nn.ReLU(),
                                          nn.Linear(4, 3)), "weight normalisation"),
}


@pytest.mark.parametrize("engine", privacy.ENGINES)
@pytest.mark.parametrize("name", list(REFUSED_LAYERS))
def test_a_layer_that_mixes_examples_is_refused_with_its_name_and_the_fix(name, engine):
    make, message = REFUSED_LAYERS[name]
    with pytest.raises(PrivacyError, match=message) as error:
        _dpsgd(make(), engine=engine)
    assert "Fix:" in str(error.value) and "(" in str(error.value).splitlines()[1]  # the layer's name and type


def test_prepare_model_replaces_every_batchnorm_affine_or_not_frozen_or_not():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), _frozen_bn(), nn.BatchNorm1d(4))
    fixed = privacy.prepare_model(model, quiet=True)
    norms = [m for m in fixed.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert not norms[0].affine and not norms[1].weight.requires_grad and norms[2].weight.requires_grad
    _dpsgd(fixed)  # accepted now


class RunningMean(nn.Module):
    """No trainable parameter, a buffer updated from every batch: an un-noised statistic of the data."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(5))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(x.detach().mean(0), alpha=0.1)
        return x - self.mean


class CountingCalls(nn.Module):
    """A buffer reassigned (not modified in place) by the forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen = self.seen + len(x)
        return x


@pytest.mark.parametrize("engine", privacy.ENGINES)
@pytest.mark.parametrize("layer", [RunningMean, CountingCalls])
def test_a_buffer_changed_by_the_private_forward_is_refused(layer, engine):
    torch.manual_seed(0)
    model = nn.Sequential(layer(), nn.Linear(5, 3))
    dp = _dpsgd(model, engine=engine)
    with pytest.raises(PrivacyError, match="changed buffer"):
        _fit(dp, _data())


class SequenceFirst(nn.Module):
    """(B, T, d) -> (T, B, d) -> a Linear per step -> back to (B, classes): nn.Transformer's default layout."""

    def __init__(self, d=5, classes=3):
        super().__init__()
        self.step, self.head = nn.Linear(d, 6), nn.Linear(6, classes)

    def forward(self, x):
        h = torch.tanh(self.step(x.transpose(0, 1)))  # (T, B, 6): the Linear sees T "examples"
        return self.head(h.mean(0))


@pytest.mark.parametrize("engine", privacy.ENGINES)
@pytest.mark.parametrize("batch", [6, 4], ids=["B=6 != T", "B=T=4"])
def test_a_sequence_first_model_is_refused(batch, engine):
    """T = 4 positions: with B = 6 the engine would find 4 norms for 6 examples; with B = T = 4 the count even
    matches, and only the comparison with examples taken one at a time (at a batch size unlike T) shows it."""
    torch.manual_seed(0)
    data = _data(n=24, shape=(4, 5))
    dp = _dpsgd(SequenceFirst(), engine=engine, noise=0.0)
    dp.poisson_batch = lambda device: torch.arange(batch)
    with pytest.raises(PrivacyError, match="dimension 0|one example at a time"):
        _fit(dp, data)


def test_a_model_that_mixes_examples_without_buffers_is_refused():
    class BatchCentred(nn.Module):  # subtracts the batch mean: each output depends on every example
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True))

    dp = _dpsgd(BatchCentred())
    with pytest.raises(PrivacyError, match="one example at a time"):
        _fit(dp, _data())


# ---------------------------------------------------------------- steps outside the engine


@pytest.mark.parametrize("engine", privacy.ENGINES)
def test_the_users_own_loop_cannot_take_a_non_private_step(engine):
    """Opacus's habit, ``loss.backward(); optimizer.step()``, would be plain SGD: it raises, the weights stay,
    nothing is accounted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    dp = _dpsgd(model, engine=engine)
    before = [p.detach().clone() for p in model.parameters()]
    data = _data()
    F.cross_entropy(dp.model(data.x_train[:8]), data.y_train[:8]).backward()
    with pytest.raises(PrivacyError, match="outside DPSGD's private step"):
        dp.optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert dp.epsilon() == 0.0 and not dp.accountants["rdp"].history


@pytest.mark.parametrize("engine", privacy.ENGINES)
def test_fit_without_the_private_step_raises(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    dp = _dpsgd(model, engine=engine)
    with pytest.raises(PrivacyError, match="outside DPSGD's private step"):
        fit(dp.model, _data(), TrainConfig(batch_size=8, max_steps=2), optimizer=dp.optimizer, callbacks=[dp])


def test_a_model_that_trained_without_accounted_steps_never_reports_epsilon():
    """A step that bypasses the optimizer altogether (a hand-written update) still cannot yield epsilon 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    dp = _dpsgd(model)

    def plain_update(batch, state):
        loss = F.cross_entropy(state.net(batch.x), batch.y)
        with torch.no_grad():
            for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                p -= 0.1 * g
        return loss.detach()

    with pytest.raises(PrivacyError, match="only 0 were private"):
        fit(dp.model, _data(), TrainConfig(batch_size=8, max_steps=2), optimizer=dp.optimizer, step=plain_update,
            callbacks=[dp])


@pytest.mark.medium
def test_detach_frees_the_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    dp = _dpsgd(model)
    _fit(dp, _data())
    bare = dp.detach()
    assert bare is model
    F.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    dp.optimizer.step()  # allowed again: the private training is over


# ---------------------------------------------------------------- per-example arguments of torch.func layers


class ShiftedScale(nn.Module):
    """No rule of its own (torch.func): (x + mean of a shared (T, d) table) * w."""

    def __init__(self, d=5):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x, table):
        return (x + table.mean(0)) * self.w


class WithTable(nn.Module):
    def __init__(self, rows=6, d=5):
        super().__init__()
        self.scale, self.head = ShiftedScale(d), nn.Linear(d, 3)
        self.register_buffer("table", torch.arange(rows * d, dtype=torch.float32).view(rows, d) / 10)

    def forward(self, x):
        return self.head(self.scale(x, self.table))


def test_a_shared_argument_as_long_as_the_batch_is_not_read_as_per_example():
    """B = T = 6: the old engine guessed from the first dimension that the (6, 5) table was per-example and gave
    each example one row of it. Noise off and no clipping, the DP step equals plain SGD on the same batch."""
    torch.manual_seed(0)
    model, reference = WithTable(), WithTable()
    reference.load_state_dict(model.state_dict())
    data = _data(n=24)
    dp = _dpsgd(model, noise=0.0, clip=1e9, lr=0.5, batch_size=6)
    dp.poisson_batch = lambda device: torch.arange(6)
    _fit(dp, data, steps=1, batch_size=6)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    F.cross_entropy(reference(data.x_train[:6]), data.y_train[:6]).backward()
    opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.medium
def test_per_example_arguments_are_declared():
    class Gate(nn.Module):  # two per-example inputs
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(5))

        def forward(self, x, mask):
            return x * mask * self.w

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.head = Gate(), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.gate(x, (x > 0).float()))

    torch.manual_seed(0)
    data = _data()
    with pytest.raises(PrivacyError, match="one example at a time"):  # the mask taken as shared: mixes examples
        _fit(_dpsgd(Model()), data)
    torch.manual_seed(0)
    _fit(_dpsgd(Model(), per_example_args={Gate: (0, 1)}), data)  # declared: accepted


# ---------------------------------------------------------------- adjacency: the sensitivity is at most C


class EmbedAndNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(12, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.embed(x)).mean(1))


def _adjacency_models():
    """Every model the engines accept in the test suite: the zoo (BatchNorm replaced), the DP tests' models, an
    embedding with LayerNorm, a 1-D convolution, a torch.func layer, a shared table."""
    zoo = [("mlp", (1, 8, 8), {"widths": (16,)}), ("cnn", (1, 8, 8), {"channels": (4, 8), "hidden": 16}),
           ("cnn", (1, 8, 8), {"channels": (4, 8), "hidden": 16, "batchnorm": True}),
           ("resnet18", (3, 8, 8), {"width": 0.125})]
    out = {f"zoo {name} {sorted(kw)}": ((lambda name=name, shape=shape, kw=kw: build_model(name, shape, 3, **kw)),
                                        shape, "float") for name, shape, kw in zoo}
    out.update({
        "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3)), (1, 6, 6),
                "float"),
        "cnn groupnorm": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                                                nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3)),
                          (1, 6, 6), "float"),
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)),
                   (2, 8), "float"),
        "embedding layernorm": (EmbedAndNorm, (4,), "tokens"),
        "torch.func layer with a shared table": (WithTable, (5,), "float"),
    })
    return out


ADJACENCY = _adjacency_models()


@pytest.mark.medium
@pytest.mark.parametrize("engine", privacy.ENGINES)
@pytest.mark.parametrize("name", list(ADJACENCY))
def test_adding_one_example_moves_the_clipped_sum_by_at_most_c(name, engine):
    """Through the real DP step, noise off, float64: S(D) from one step on D, S(D + z) from the same start on D
    plus one example z (scaled up so that its gradient is clipped), S = (theta_0 - theta_1) B / lr. DP-SGD
    needs ||S(D + z) - S(D)|| <= C. Dropout is off (its masks are the mechanism's own randomness, coupled)."""
    make, shape, kind = ADJACENCY[name]
    if engine == "opacus" and name == "torch.func layer with a shared table":
        pytest.skip("Opacus has no grad sampler for a custom layer")
    clip, lr, B = 0.5, 1.0, 6
    g = torch.Generator().manual_seed(1)
    if kind == "tokens":
        x = torch.randint(0, 12, (B + 1, *shape), generator=g)
    else:
        x = torch.randn(B + 1, *shape, generator=g, dtype=torch.float64)
        x[-1] *= 10
    y = torch.randint(0, 3, (B + 1,), generator=g)

    def clipped_sum(n):
        torch.manual_seed(0)
        model = privacy.prepare_model(make(), quiet=True).double()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
        start = [p.detach().clone() for p in model.parameters()]
        dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), n=B + 1, batch_size=B, steps=1,
                           config=privacy.DPConfig(noise_multiplier=0.0, max_grad_norm=clip, engine=engine))
        dp.poisson_batch = lambda device: torch.arange(n)
        data = Data("toy", x[:n], y[:n], x[:n], y[:n], 3)
        fit(dp.model, data, TrainConfig(batch_size=B, max_steps=1), optimizer=dp.optimizer, step=dp.step(),
            callbacks=[dp])
        return torch.cat([((a - b.detach()) * B / lr).reshape(-1) for a, b in zip(start, model.parameters())])

    sensitivity = float(torch.linalg.vector_norm(clipped_sum(B + 1) - clipped_sum(B)))
    assert sensitivity <= clip * (1 + 1e-6)
    assert sensitivity > 0.5 * clip  # the added example did act: its clipped gradient is in the difference


# ---------------------------------------------------------------- what a run releases


@pytest.mark.medium
def test_a_private_run_releases_no_unnoised_training_metric_and_says_where_the_noise_came_from(tmp_path):
    torch.manual_seed(0)
    dp = _dpsgd(nn.Sequential(nn.Linear(5, 3)))
    rows = fit(dp.model, _data(), TrainConfig(batch_size=8, max_steps=4, eval_every=2, eval_train=True),
               optimizer=dp.optimizer, step=dp.step(), callbacks=[dp], out_dir=tmp_path)
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((tmp_path / "final.json").read_text())
    for row in [*rows, *written, final]:
        assert not [k for k in row if k.startswith("train_") and k != "train_metrics"], row
        assert row["noise_source"] == "the run's seed: reproducible, not for release" and row["epsilon_rdp"] > 0


# ---------------------------------------------------------------- secure mode


def test_secure_mode_noise_is_gaussian():
    """Kolmogorov-Smirnov against N(0, std^2) on 20,000 draws (seed-free: a false alarm has probability 1e-3),
    and the first two moments within 5 standard errors."""
    noise = privacy.GaussianNoise(std=2.5, seed=0, secure=True)
    z = noise.draw_one(torch.zeros(20_000, dtype=torch.float64)).numpy()
    assert stats.kstest(z, "norm", args=(0, 2.5)).pvalue > 1e-3
    assert abs(z.mean()) < 5 * 2.5 / math.sqrt(len(z)) and abs(z.std() / 2.5 - 1) < 5 / math.sqrt(2 * len(z))


def test_secure_mode_noise_comes_from_the_csprng_and_not_from_torchs_generator(monkeypatch):
    """Two draws after the same torch seed differ; the noise is exactly Box-Muller of the operating system's
    bytes (substituted here by known ones), 4 draws summed and halved; no torch.Generator is made or saved."""
    noise = privacy.GaussianNoise(std=1.0, seed=0, secure=True)
    torch.manual_seed(0)
    a = noise.draw_one(torch.zeros(8))
    torch.manual_seed(0)
    b = noise.draw_one(torch.zeros(8))
    assert not torch.equal(a, b)
    asked = []

    def known(k):
        asked.append(k)
        return bytes(range(256)) * (k // 256) + bytes(range(k % 256))

    monkeypatch.setattr(privacy, "_random_bytes", known)
    z = noise.draw_one(torch.zeros(3, dtype=torch.float64))
    raw = torch.frombuffer(bytearray(known(asked[0])), dtype=torch.int64).view(2, -1)
    u = (((raw >> 11) & (2**53 - 1)).double() + 0.5) / 2**53
    r, t = torch.sqrt(-2 * torch.log(u[0])), 2 * math.pi * u[1]
    normals = torch.cat([r * torch.cos(t), r * torch.sin(t)])[:12].view(4, 3)
    torch.testing.assert_close(z, normals.sum(0) / 2, rtol=1e-12, atol=1e-12)
    assert noise.generator is None and noise.state_dict() == {"secure": True}


@pytest.mark.medium
def test_secure_mode_run_writes_no_secret_state_into_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=24, batch_size=8, steps=4,
                       config=privacy.DPConfig(noise_multiplier=1.0, secure_mode=True))
    rows = fit(dp.model, _data(), TrainConfig(batch_size=8, max_steps=2), optimizer=dp.optimizer, step=dp.step(),
               callbacks=[dp])
    assert dp.state_dict()["noise"] == {"secure": True}
    assert rows[-1]["noise_source"].startswith("operating-system CSPRNG")


@pytest.mark.medium
def test_secure_mode_with_the_opacus_engine_draws_its_noise_from_the_csprng(monkeypatch):
    """Opacus's own secure mode draws from torch's Mersenne Twister; ours replaces its noise by the stream's, so
    with engine="opacus" every noise value of a step comes from os.urandom (16 bytes per Box-Muller pair, two
    pairs per value) and two runs after the same torch seed end apart."""
    asked = []
    real = privacy._random_bytes
    monkeypatch.setattr(privacy, "_random_bytes", lambda k: asked.append(k) or real(k))

    def run():
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=24, batch_size=8, steps=4,
                           config=privacy.DPConfig(noise_multiplier=1.0, secure_mode=True, engine="opacus"))
        _fit(dp, _data(), steps=1)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), dp

    a, dp = run()
    assert sum(asked) == 16 * 2 * a.numel() and dp.noise.generator is None
    b, _ = run()
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- clear errors


@pytest.mark.parametrize("kwargs,name", [
    ({"batch_size": 30}, "batch_size"), ({"batch_size": 0}, "batch_size"), ({"n": 0}, "n="),
    ({"clip": 0.0}, "max_grad_norm"), ({"clip": math.nan}, "max_grad_norm"), ({"noise": -1.0}, "noise_multiplier"),
])
def test_settings_the_accountant_cannot_honour_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"DPSGD: {name}"):
        _dpsgd(nn.Linear(5, 3), **kwargs)


def test_a_dataloader_given_to_the_private_step_is_named():
    dp = _dpsgd(nn.Linear(5, 3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 5), torch.randint(0, 3, (24,))),
                                         batch_size=8)
    with pytest.raises(PrivacyError, match="given a DataLoader"):
        fit(dp.model, loader, TrainConfig(max_steps=1), optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])


@pytest.mark.medium
@pytest.mark.parametrize("engine", privacy.ENGINES)
@pytest.mark.parametrize("change", ["unfreeze", "replace"])
def test_a_layer_unfrozen_or_replaced_after_building_is_refused(change, engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    dp = _dpsgd(model, engine=engine)
    _fit(dp, _data(), steps=1)
    if change == "unfreeze":
        model[0].requires_grad_(True)
    else:
        model[2] = nn.Linear(4, 3)
    with pytest.raises(PrivacyError, match="became trainable or were added"):
        step = dp.step()
        state = type("State", (), {})()
        state.data, state.loss_fn, state.optimizer, state.net = _data(), F.cross_entropy, dp.optimizer, dp.model
        step(Batch(torch.zeros(1, 5), torch.zeros(1, dtype=torch.long), torch.zeros(1)), state)


# ---------------------------------------------------------------- the experiments: selection and names


def test_a_sweep_that_selects_on_a_private_split_is_refused_unless_declared_public(tmp_path, capsys):
    from backproplab import experiments
    from backproplab.cli import main

    assert main(["sweep", "privacy", "--grid", "lr=0.1,0.2", "--seeds", "1", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert "validation_public=true" in capsys.readouterr().err and not any(tmp_path.rglob("*.json"))
    exp = experiments.get("privacy")
    cfg = experiments.make_config(exp, ["validation=0.2", "validation_public=true"])
    assert experiments.private_selection_note(cfg).startswith("validation split declared public")
    for name in ("privacy", "stobatch"):  # plain runs (no validation split) are unaffected
        experiments.make_config(experiments.get(name), [])
    with pytest.raises(experiments.ConfigError, match="validation_public"):
        experiments.make_config(experiments.get("stobatch"), ["validation=0.1"])


def test_a_fixed_noise_multiplier_names_its_arms_by_the_noise_not_by_an_epsilon():
    from backproplab import experiments
    from backproplab.experiments import privacy as privacy_experiment

    cfg = experiments.make_config(experiments.get("privacy"), ["noise_multiplier=1.1", "adversarial=clean",
                                                               "augment_sigmas=0"])
    names = [a.name for a in privacy_experiment.arms(cfg)]
    assert names == ["nonprivate-clean-aug0", "noise1.1-clean-aug0"]
    assert [c.name for c in privacy_experiment.claims(cfg)] == []  # no epsilon comparison without epsilon arms


@pytest.mark.parametrize("engine", ["ghost", "opacus"])
@pytest.mark.parametrize("given", ["none", "another"])
def test_fit_stepping_another_optimizer_than_dp_optimizer_is_refused(engine, given):
    """``fit(dp.model, ..., step=dp.step())`` without ``optimizer=dp.optimizer`` builds its own optimizer from the
    TrainConfig (or steps the one given): its learning rate and schedule would not be the ones that step (ghost
    engine) and its step would skip the clipping and the noise (Opacus engine: before, a misleading message
    about the batch dimension). Refused before anything moves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    dp = _dpsgd(model, engine=engine)
    before = [p.detach().clone() for p in model.parameters()]
    other = {} if given == "none" else {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    with pytest.raises(PrivacyError, match=r"optimizer=dp\.optimizer"):
        fit(dp.model, _data(), TrainConfig(optimizer="sgd", lr=0.1, batch_size=8, max_steps=2), step=dp.step(),
            callbacks=[dp], **other)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _fit(dp, _data())  # the right call trains
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

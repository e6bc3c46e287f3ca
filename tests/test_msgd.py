"""MSGD weightings against per-example gradients from torch.func (vmap(grad)), float64.

Covariance checks use K draws with a fixed seed; the relative Frobenius error of an empirical
covariance from K draws is about sqrt(2/K) x (a few) here, so K = 40000 and tolerance 0.06.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from backproplab.methods import msgd

N, B, D_IN = 24, 4, 3
K, TOL = 40000, 0.06


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(N, D_IN, dtype=torch.float64), torch.randint(0, 2, (N,))
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([per[k].reshape(N, -1) for k in params], 1)  # (n, d): row i = grad l_i
    return model, x, y, G


def _weighted_grad(model, x, y, idx, w):
    model.zero_grad()
    losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
    msgd.LossWeighting.weighted_loss(losses, w).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", sorted(msgd.WEIGHTINGS))
def test_weighted_loss_gradient_is_G_w(problem, name):
    model, x, y, G = problem
    weighting = _make(name)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        idx, w = weighting.sample(g)
        dense = torch.zeros(N, dtype=torch.float64).index_add_(0, idx, w.double())
        torch.testing.assert_close(_weighted_grad(model, x, y, idx, w.double()), G.T @ dense, rtol=1e-10, atol=1e-12)


def _make(name):
    cls = msgd.WEIGHTINGS[name]
    if name == "msgd_fisher_b":
        return cls(N, B, noise_batch=6)
    if name == "large_batch":
        return cls(N, B, large_batch=12)
    return cls(N, B)


def _draws(weighting, k=K):
    g = torch.Generator().manual_seed(2)
    torch.set_default_dtype(torch.float64)
    try:
        return torch.stack([weighting.dense(g) for _ in range(k)])
    finally:
        torch.set_default_dtype(torch.float32)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.medium
@pytest.mark.parametrize("name", sorted(msgd.WEIGHTINGS))
def test_mean_is_the_gd_gradient(problem, name):
    _, _, _, G = problem
    W = _draws(_make(name), 20000)
    gd = G.mean(0)
    noise_scale = (G.T @ (W - 1 / N).T).std(1).norm() / math.sqrt(20000)  # standard error of the mean
    assert float((G.T @ W.mean(0) - gd).norm()) < 5 * float(noise_scale) + 1e-12


@pytest.mark.medium
def test_covariances_match_their_formulas(problem):
    _, _, _, G = problem
    C = (G - G.mean(0)).T @ (G - G.mean(0)) / N
    Fisher = G.T @ G / N
    sgd_cov = msgd.sgd_noise_covariance(G, B)
    torch.testing.assert_close(sgd_cov, (N - B) / (B * (N - 1)) * C)

    def empirical(weighting):
        W = _draws(weighting)
        V = W - W.mean(0)
        return G.T @ (V.T @ V / (len(W) - 1)) @ G

    cases = {
        "sgd": (msgd.SGD(N, B), sgd_cov),
        "msgd_cov (matches SGD exactly)": (msgd.MSGDCov(N, B), sgd_cov),
        "msgd_fisher": (msgd.MSGDFisher(N, B), (N / B - 1) / N * Fisher),
        "msgd_bernoulli": (msgd.MSGDBernoulli(N, B), (1 / B - 1 / N) * Fisher),
        "msgd_fisher_b": (msgd.MSGDFisherB(N, B, noise_batch=6), Fisher / B),
    }
    lb = msgd.LargeBatchWeighted(N, B, large_batch=12)
    cases["large_batch"] = (lb, (N - 12) / (12 * (N - 1)) * C + lb.scale**2 / 12 * Fisher)
    for label, (weighting, expected) in cases.items():
        assert _rel(empirical(weighting), expected) < TOL, label


def test_default_scales_follow_from_n_and_b():
    assert math.isclose(msgd.MSGDCov(1000, 50).scale ** 2, (950 / 50) * 1000 / 999)
    assert math.isclose(msgd.MSGDFisher(1000, 50).scale ** 2, 19.0)
    assert math.isclose(msgd.MSGDFisherB(1000, 50, noise_batch=100).scale ** 2, 1000**2 / (100 * 50))
    assert math.isclose(msgd.LargeBatchWeighted(1000, 50, large_batch=1000).scale ** 2, 19.0)
    assert msgd.MSGDFisher(1000, 50, scale=0.5).scale == 0.5


@pytest.mark.medium
def test_gld_trace_estimate_matches_the_sgd_noise_trace(problem):
    model, x, y, G = problem
    gld = msgd.GLD(N, B, probes=4000)
    full = G.mean(0)
    estimate = gld.estimate_trace(model, lambda o, t: F.cross_entropy(o, t), x, y, full,
                                  generator=torch.Generator().manual_seed(3))
    exact = float(torch.trace(msgd.sgd_noise_covariance(G, B)))
    assert abs(estimate - exact) / exact < 0.05


@pytest.mark.medium
def test_gld_step_adds_noise_of_the_sgd_noise_trace(problem):
    """Measured on the weights the loop actually moved: with lr eta, each step's update minus the exact
    full-batch gradient step is eta sigma xi; its mean squared norm must equal the exact SGD noise trace
    tr Cov_SGD (from per-example gradients at the pre-step weights), d-independent of how sigma is set."""
    from backproplab.data import Data
    from backproplab.train import TrainConfig, fit

    model, x, y, _ = problem
    data = Data("toy", x, y, x, y, 2)
    gld = msgd.GLD(N, B)  # the authors' estimator: 100 probes every 10 steps
    assert (gld.probes, gld.every) == (100, 10)
    m = nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    m.load_state_dict(model.state_dict())
    lr = 1e-3
    weights = [torch.cat([p.detach().reshape(-1) for p in m.parameters()])]

    class Record:
        def on_step_end(self, state):
            weights.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))

    torch.manual_seed(4)
    fit(m, data, TrainConfig(optimizer="gd", lr=lr, epochs=60), step=gld.training_step(), callbacks=[Record(), gld])
    names = [n for n, _ in m.named_parameters()]
    ratios = []
    for before, after in zip(weights[:-1], weights[1:]):
        params = dict(zip(names, torch.split(before, [p.numel() for p in m.parameters()])))
        params = {k: v.view_as(dict(m.named_parameters())[k]) for k, v in params.items()}
        per = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(m, p, (xi[None],)), yi[None])),
                   in_dims=(None, 0, 0))(params, x, y)
        G = torch.cat([per[k].reshape(N, -1) for k in names], 1)
        noise = (before - after) / lr - G.mean(0)
        ratios.append(float(noise.pow(2).sum()) / float(torch.trace(msgd.sgd_noise_covariance(G, B))))
    # 60 steps of a chi^2_d / d (d = 22) with a 100-probe trace estimate: the mean is within 15% of 1
    assert len(ratios) == 60 and abs(sum(ratios) / len(ratios) - 1) < 0.15


def test_weighted_step_in_the_loop_equals_G_w(problem):
    """Through fit(): one step with lr 1 moves the weights by -G w for the weights the step drew."""
    from backproplab.data import Data
    from backproplab.train import TrainConfig, fit

    model, x, y, G = problem
    data = Data("toy", x, y, x, y, 2)
    weighting = msgd.MSGDCov(N, B)
    drawn = []
    original = weighting.sample

    def spy(generator=None, device="cpu"):
        idx, w = original(generator, device)
        drawn.append(torch.zeros(N, dtype=torch.float64).index_add_(0, idx, w.double()))
        return idx, w

    weighting.sample = spy
    m = nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    m.load_state_dict(model.state_dict())
    before = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    fit(m, data, TrainConfig(optimizer="gd", lr=1.0, max_steps=1), step=msgd.weighted_gradient_step(weighting, 5))
    after = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    torch.testing.assert_close(after, before - G.T @ drawn[0], rtol=1e-10, atol=1e-12)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        msgd.SGD(10, 20)
    with pytest.raises(ValueError, match="large_batch"):
        msgd.LargeBatchWeighted(10, 4, large_batch=2)


def test_the_large_batch_lies_strictly_between_b_and_n():
    from backproplab import experiments
    from backproplab.experiments.msgd import MSGDConfig, large_batch

    cfg = MSGDConfig()
    assert cfg.batch_size < large_batch(cfg, cfg.n_train) < cfg.n_train
    exp = experiments.get("msgd")
    for bad in ("large_factor=20", "large_factor=1"):  # B = n is GD (weighted: MSGD-Fisher); B = b is SGD
        with pytest.raises(experiments.ConfigError, match="large_factor"):
            experiments.make_config(exp, ["datasets=digits", bad])


def test_constant_gld_sigma_is_chosen_by_validation_accuracy_inside_the_training_subset(monkeypatch):
    """The sweep picks the best validation accuracy, and every validation example is a training example of
    the tuning seed: the test pool is never seen."""
    from backproplab import train
    from backproplab.data import load_dataset
    from backproplab.experiments import build_config
    from backproplab.experiments import msgd as experiment

    accuracy = {0.003: 0.5, 0.01: 0.9, 0.03: 0.7}
    seen = []

    def fake_fit(model, data, config, step=None, callbacks=()):
        seen.append(data)
        return [{"test_acc": accuracy[callbacks[0].sigma], "step": config.max_steps}]

    monkeypatch.setattr(train, "fit", fake_fit)
    experiment._tuned_gld_sigma.cache_clear()
    cfg = build_config(experiment.MSGDConfig, {"datasets": ("digits",), "n_train": 300, "steps": 5})
    assert experiment.tuned_gld_sigma(cfg, "digits", "cpu") == 0.01
    assert len(seen) == 3
    full = load_dataset("digits", seed=experiment.TUNING_SEED, n_train=300, rest_to_test=True)
    train_rows = {tuple(r.flatten().tolist()) for r in full.x_train}
    for data in seen:
        assert len(data.x_train) + len(data.x_test) == 300
        assert all(tuple(r.flatten().tolist()) in train_rows for r in data.x_test)
    experiment._tuned_gld_sigma.cache_clear()
    assert experiment.tuned_gld_sigma(experiment.MSGDConfig(gld_sigmas=(), gld_sigma=0.2), "digits", "cpu") == 0.2

"""DP-SGD in the user's own loop over a DataLoader (``privacy.PrivacyEngine``, Opacus's three calls): the same
mechanism as ``fit`` (same sigma, epsilon and, with the same seed, weights), private by its adjacency test
(adding one example moves the update by at most C, and every parameter gets the stream's noise), and every
loop that would void the guarantee refused."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from backproplab.data import Data
from backproplab.methods import privacy
from backproplab.methods.privacy import PrivacyError
from backproplab.train import TrainConfig, fit

pytest.importorskip("opacus")

N, B, EPOCHS = 44, 8, 2  # n not a multiple of B: an epoch is ceil(n / B) steps


def _tensors(n=N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _model():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _loop(model, optimizer, loader, epochs=EPOCHS):
    """The user's loop, exactly as without privacy."""
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def _three_calls(x, y, epsilon=2.0, clip=1.0, lr=0.2, **loader_kwargs):
    torch.manual_seed(0)
    model = _model()
    engine = privacy.PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True, **loader_kwargs),
        target_epsilon=epsilon, target_delta=1e-5, epochs=EPOCHS, max_grad_norm=clip)
    return engine, model, optimizer, loader


@pytest.mark.medium
def test_the_three_call_loop_is_fits_mechanism_same_sigma_epsilon_and_weights():
    """fit (engine="opacus") and the user's loop, same seed, float64: the same sigma, the same epsilons after
    the same number of steps, and the same weights to 1e-10 (same Poisson batches, same noise draws)."""
    x, y = _tensors()
    engine, model, optimizer, loader = _three_calls(x, y)
    _loop(model, optimizer, loader)

    torch.manual_seed(0)
    reference = _model()
    cfg = TrainConfig(optimizer="sgd", lr=0.2, batch_size=B, epochs=EPOCHS)
    dp = privacy.DPSGD(reference, torch.optim.SGD(reference.parameters(), lr=0.2), n=N, batch_size=B,
                       steps=privacy.planned_steps(cfg, N),
                       config=privacy.DPConfig(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, engine="opacus"))
    fit(dp.model, Data("toy", x, y, x, y, 3), cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])

    steps = sum(h[2] for h in engine.dp.accountants["rdp"].history)
    assert len(loader) == math.ceil(N / B) and steps == EPOCHS * math.ceil(N / B)
    assert engine.noise_multiplier == dp.noise_multiplier > 0
    assert engine.get_epsilon() == dp.epsilon("rdp") == pytest.approx(2.0, rel=0.02)
    assert engine.get_epsilon(accountant="prv") == dp.epsilon("prv")
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.manual_seed(0)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), _model().parameters()))  # it trained


@pytest.mark.medium
def test_the_loader_draws_poisson_samples_at_rate_b_over_n():
    """Every example joins a batch independently with probability q = B / n: over 80 epochs each example's
    count is Binomial(80 ceil(n / B), q) (a chi-square test over the n counts, fixed seed, alpha 1e-3), the batch size
    varies, and one batch's examples are the dataset's rows (indices recovered from the inputs)."""
    from scipy import stats

    x, y = _tensors()
    x[:, 0] = torch.arange(N, dtype=x.dtype)  # the first feature names the example
    engine, model, optimizer, loader = _three_calls(x, y)
    counts, sizes = torch.zeros(N), []
    for _ in range(80):
        for xb, _yb in loader:
            counts[xb[:, 0].long()] += 1
            sizes.append(len(xb))
        engine._drawn.clear()
    q, draws = B / N, 80 * len(loader)
    chi2 = float(((counts - draws * q) ** 2 / (draws * q * (1 - q))).sum())
    assert stats.chi2.sf(chi2, N) > 1e-3
    assert len(set(sizes)) > 3 and abs(sum(sizes) / draws - B) < 0.5


def test_adding_one_example_moves_the_update_by_at_most_c_and_every_parameter_is_noised():
    """Adjacency through the real loop (noise off, the batch forced to the whole dataset): S = (theta_0 -
    theta_1) B / lr for D and D + z (z scaled up so that it is clipped); ||S(D + z) - S(D)|| <= C and > C / 2.
    Then noise on: theta_1 - noise-free theta_1 is, for every parameter, exactly -lr / B times the stream's
    draw of N(0, (sigma C)^2)."""
    clip, lr = 0.5, 1.0
    x, y = _tensors(n=B + 1)
    x[-1] *= 10

    def one_step(n, noise):
        torch.manual_seed(0)
        model = _model()
        start = [p.detach().clone() for p in model.parameters()]
        engine = privacy.PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            data_loader=DataLoader(TensorDataset(x[:n], y[:n]), batch_size=B), noise_multiplier=noise,
            max_grad_norm=clip)
        engine.dp.poisson_batch = lambda device: torch.arange(n)
        for xb, yb in loader:  # the user's loop, for one step: the batch is the whole dataset
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            break
        return start, list(model.parameters()), engine

    def update(n, noise=0.0):
        start, end, _ = one_step(n, noise)
        return torch.cat([((a - b.detach()) * B / lr).reshape(-1) for a, b in zip(start, end)])

    sensitivity = float(torch.linalg.vector_norm(update(B + 1) - update(B)))
    assert 0.5 * clip < sensitivity <= clip * (1 + 1e-6)

    sigma = 1.3
    start, noisy, engine = one_step(B + 1, sigma)
    _, clean, _ = one_step(B + 1, 0.0)
    stream = privacy.GaussianNoise(sigma * clip, engine.dp.noise.seed)
    for p_noisy, p_clean in zip(noisy, clean):
        expected = -lr / B * stream.draw_one(p_noisy.detach())
        torch.testing.assert_close(p_noisy.detach() - p_clean.detach(), expected, rtol=1e-9, atol=1e-12)
        assert float(expected.abs().min()) > 0


def test_secure_mode_draws_the_loops_noise_from_the_csprng(monkeypatch):
    """secure_mode: every noise value of the step comes from os.urandom (counted), none from a torch
    generator: two runs after the same torch seed end at different weights."""
    x, y = _tensors()
    asked = []
    real = privacy._random_bytes
    monkeypatch.setattr(privacy, "_random_bytes", lambda k: asked.append(k) or real(k))

    def run():
        torch.manual_seed(0)
        model = _model()
        engine = privacy.PrivacyEngine(secure_mode=True)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=B), noise_multiplier=1.0, max_grad_norm=1.0)
        _loop(model, optimizer, loader, epochs=1)
        return [p.detach().clone() for p in model.parameters()], engine

    a, engine = run()
    n_params = sum(p.numel() for p in a)
    assert sum(asked) >= 16 * 2 * n_params * len(DataLoader(TensorDataset(x, y), batch_size=B))
    b, _ = run()
    assert all(not torch.equal(p, q) for p, q in zip(a, b))
    assert engine.state_dict()["noise"] == {"secure": True}


@pytest.mark.medium
def test_an_empty_poisson_batch_is_a_noise_only_step():
    x, y = _tensors()
    engine, model, optimizer, loader = _three_calls(x, y)
    engine.dp.poisson_batch = lambda device: torch.arange(0)
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = next(iter(loader))
    assert xb.shape == (0, 5) and yb.shape == (0,)
    optimizer.zero_grad()
    F.cross_entropy(model(xb), yb, reduction="sum").backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # noise moved every one
    assert engine.get_epsilon() > 0


# ---------------------------------------------------------------- loops that would void the guarantee


def _original_loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)


@pytest.mark.medium
def test_a_loop_over_the_original_loader_is_refused():
    x, y = _tensors()
    engine, model, optimizer, _ = _three_calls(x, y)
    with pytest.raises(PrivacyError, match="0 batches were drawn from the private loader"):
        _loop(model, optimizer, _original_loader(x, y), epochs=1)
    assert engine.get_epsilon() == 0.0  # nothing accounted, nothing moved


@pytest.mark.medium
def test_a_batch_the_loader_did_not_draw_is_refused():
    x, y = _tensors()
    engine, model, optimizer, loader = _three_calls(x, y)
    next(iter(loader))
    optimizer.zero_grad()
    F.cross_entropy(model(x[:3]), y[:3]).backward()  # drawn one batch, trained on other data
    with pytest.raises(PrivacyError, match="the backward saw 3 examples"):
        optimizer.step()


@pytest.mark.medium
@pytest.mark.parametrize("mistake", ["two batches per step", "no zero_grad"])
def test_accumulating_batches_or_backwards_is_refused(mistake):
    """Two batches before one step (each example's sensitivity counted once per step, the accountant one
    sample) or the same batch's backward twice without zero_grad (each example clipped twice over)."""
    x, y = _tensors()
    engine, model, optimizer, loader = _three_calls(x, y)
    batches = iter(loader)
    xb, yb = next(batches)
    optimizer.zero_grad()
    F.cross_entropy(model(xb), yb).backward()
    if mistake == "two batches per step":
        xb, yb = next(batches)
    F.cross_entropy(model(xb), yb).backward()
    with pytest.raises(PrivacyError, match="2 batches were drawn" if mistake == "two batches per step"
                       else "2 backward passes"):
        optimizer.step()
    assert engine.get_epsilon() == 0.0


def test_stepping_the_wrapped_optimizer_directly_is_refused():
    x, y = _tensors()
    torch.manual_seed(0)
    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = privacy.PrivacyEngine()
    private_model, _, loader = engine.make_private(module=model, optimizer=plain, data_loader=_original_loader(x, y),
                                                   noise_multiplier=1.0, max_grad_norm=1.0)
    xb, yb = next(iter(loader))
    F.cross_entropy(private_model(xb), yb).backward()
    with pytest.raises(PrivacyError, match="stepped directly"):
        plain.step()


class _CentreTheBatch(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("model,message", [
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), "BatchNorm mixes"),
    (lambda: nn.Sequential(nn.Linear(5, 4), _CentreTheBatch(), nn.Linear(4, 3)), "mixes the examples"),
])
def test_a_model_that_mixes_examples_is_refused_at_make_private(model, message):
    x, y = _tensors(dtype=torch.float32)
    m = model()
    with pytest.raises(PrivacyError, match=message):
        privacy.PrivacyEngine().make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                             data_loader=_original_loader(x, y), noise_multiplier=1.0,
                                             max_grad_norm=1.0)


def test_loaders_poisson_sampling_cannot_serve_are_named():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(5), 0

    m = _model()
    make = privacy.PrivacyEngine().make_private
    with pytest.raises(PrivacyError, match="iterable-only"):
        make(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), data_loader=DataLoader(Stream()),
             noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = _tensors()
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(N)), B, False)
    with pytest.raises(ValueError, match="no batch_size"):
        make(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
             data_loader=DataLoader(TensorDataset(x, y), batch_sampler=sampler), noise_multiplier=1.0,
             max_grad_norm=1.0)

"""DP-SGD on Opacus, attacks and certification against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from backproplab.data import Data
from backproplab.methods import privacy, robustness
from backproplab.train import Batch, TrainConfig, fit

pytest.importorskip("opacus")


@pytest.mark.medium
def test_accountants_reproduce_published_values():
    """sigma 1.1, batch 256 of 60000, 60 epochs, delta 1e-5 (Abadi et al.'s MNIST setting)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    q = 256 / 60000
    steps = int(60 / q)
    model = nn.Linear(2, 2)
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=60000, batch_size=256, steps=steps,
                       config=privacy.DPConfig(noise_multiplier=1.1, delta=1e-5))
    for acc in dp.accountants.values():
        acc.history = [(1.1, q, steps)]
    assert abs(dp.epsilon("rdp") - 2.60) < 0.01 and abs(dp.epsilon("prv") - 2.39) < 0.01
    for cls, kind in ((RDPAccountant, "rdp"), (PRVAccountant, "prv")):
        ref = cls()
        ref.history = [(1.1, q, steps)]
        assert math.isclose(dp.epsilon(kind), ref.get_epsilon(1e-5), rel_tol=1e-9)


def _toy(n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)
    return Data("toy", x, y, x, y, 3)


@pytest.mark.medium
def test_reported_epsilon_equals_opacus_accountant_for_the_steps_taken():
    from opacus.accountants import RDPAccountant

    data = _toy()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=16, epochs=3)
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=64, batch_size=16, steps=12,
                       config=privacy.DPConfig(noise_multiplier=0.9, max_grad_norm=1.0, delta=1e-3))
    history = fit(dp.model, data, cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])
    ref = RDPAccountant()
    ref.history = [(0.9, 16 / 64, 12)]
    assert math.isclose(history[-1]["epsilon_rdp"], ref.get_epsilon(1e-3), rel_tol=1e-9)
    assert history[0]["epsilon_rdp"] < history[-1]["epsilon_rdp"]


def _one_dp_step(model, x, y, lr, noise, clip):
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), n=len(x), batch_size=len(x), steps=1,
                       config=privacy.DPConfig(noise_multiplier=noise, max_grad_norm=clip))
    dp.poisson_batch = lambda device: torch.arange(len(x))  # a fixed batch, for the comparison only
    data = Data("toy", x, y, x, y, 3)

    class State:
        pass

    state = State()
    state.data, state.loss_fn, state.optimizer, state.net = data, F.cross_entropy, dp.optimizer, dp.model
    dp.step()(Batch(x, y, torch.arange(len(x))), state)
    return dp


def test_no_noise_no_clipping_equals_plain_sgd():
    data = _toy(n=12)
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    b = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    b.load_state_dict(a.state_dict())
    _one_dp_step(a, data.x_train, data.y_train, lr=0.5, noise=0.0, clip=1e9)
    opt = torch.optim.SGD(b.parameters(), lr=0.5)
    F.cross_entropy(b(data.x_train), data.y_train).backward()
    opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipped_per_example_gradients_equal_a_micro_batch_loop():
    data = _toy(n=10)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    reference = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    reference.load_state_dict(model.state_dict())
    clip, lr = 0.05, 1.0
    _one_dp_step(model, data.x_train, data.y_train, lr=lr, noise=0.0, clip=clip)
    total = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(10):  # one example at a time: its gradient, clipped to norm <= clip
        grads = torch.autograd.grad(F.cross_entropy(reference(data.x_train[i:i + 1]), data.y_train[i:i + 1]),
                                    list(reference.parameters()))
        norm_i = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm_i) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    for p, q, t in zip(model.parameters(), reference.parameters(), total):
        torch.testing.assert_close(p, q - lr * t / 10, rtol=1e-4, atol=1e-6)


def test_batchnorm_is_converted_with_a_message_and_unsupported_layers_fail_early(capsys):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    fixed = privacy.prepare_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert "GroupNorm" in capsys.readouterr().err

    class ScaleWithBuffer(nn.Module):  # trainable and holding a buffer: its buffer would not be private
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.register_buffer("seen", torch.zeros(3))

        def forward(self, x):
            return x * self.w

    with pytest.raises(NotImplementedError, match="trainable layer with buffers"):
        privacy.prepare_model(nn.Sequential(nn.Linear(3, 3), ScaleWithBuffer()))


# ---------------------------------------------------------------- attacks


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    return model, x, y


@pytest.mark.parametrize("norm_kind", ["linf", "l2"])
def test_pgd_increases_the_loss_and_stays_in_the_ball(classifier, norm_kind):
    model, x, y = classifier
    eps = 0.3
    adv = robustness.pgd(model, x, y, eps, steps=20, norm=norm_kind, generator=torch.Generator().manual_seed(0))
    d = adv - x
    size = d.abs().amax(1) if norm_kind == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.05
    # and it beats a random point of the same ball
    rnd = robustness.project(torch.randn_like(x), eps, norm_kind)
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x + rnd), y)


def test_fgsm_and_mim(classifier):
    model, x, y = classifier
    adv = robustness.fgsm(model, x, y, 0.1)
    g = torch.autograd.functional.jacobian(lambda inp: F.cross_entropy(model(inp), y), x)
    torch.testing.assert_close(adv, x + 0.1 * g.sign())
    adv = robustness.mim(model, x, y, 0.2, steps=5)
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


# ---------------------------------------------------------------- certification


class Linear2(nn.Module):
    """Binary linear classifier: class 1 iff w.x + b > 0. Under N(0, sigma^2 I) noise pA is known."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def test_certify_radius_is_a_valid_lower_bound_on_a_linear_classifier():
    torch.manual_seed(4)
    w, b, sigma, alpha = torch.tensor([1.0, -2.0, 0.5]), 0.3, 0.5, 0.001
    model = Linear2(w, b)
    xs = torch.randn(100, 3)
    g = torch.Generator().manual_seed(5)
    ratios = []
    for x in xs:
        margin = float(x @ w + b)
        true_class, true_radius = int(margin > 0), abs(margin) / float(w.norm())  # = sigma Phi^-1(pA)
        c, radius = robustness.certify(model, x, sigma, n0=100, n=2000, alpha=alpha, num_classes=2, generator=g)
        if c != robustness.ABSTAIN:
            assert c == true_class
            assert radius <= true_radius + 1e-9
            ratios.append(radius / true_radius)
    assert len(ratios) > 60 and sum(ratios) / len(ratios) > 0.5  # valid, and not trivially small


def test_predict_abstains_at_the_stated_rate_on_the_decision_boundary():
    w, b, sigma, alpha = torch.tensor([1.0, 0.0]), 0.0, 1.0, 0.1
    model = Linear2(w, b)
    x = torch.tensor([0.0, 3.0])  # on the boundary: pA = 1/2 exactly
    g = torch.Generator().manual_seed(6)
    answers = [robustness.smoothed_predict(model, x, sigma, 200, alpha, 2, generator=g) for _ in range(300)]
    returned = sum(a != robustness.ABSTAIN for a in answers) / 300
    # P[return a class] <= alpha; binomial sd at alpha=0.1, 300 trials: 0.017
    assert returned <= alpha + 3 * 0.017
    far = torch.tensor([3.0, 0.0])  # pA = Phi(3) = 0.9987: essentially never abstains
    assert robustness.smoothed_predict(model, far, sigma, 200, alpha, 2, generator=g) == 1


def test_radius_never_exceeds_the_bound_implied_by_n():
    class Always0(nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)

    sigma, n, alpha = 0.25, 500, 0.001
    c, radius = robustness.certify(Always0(), torch.zeros(4), sigma, 10, n, alpha, 2)
    bound = robustness.max_certifiable_radius(sigma, n, alpha)
    assert c == 0 and math.isclose(radius, bound, rel_tol=1e-9)
    assert math.isclose(bound, sigma * norm.ppf(alpha ** (1 / n)))


def test_pixeldp_bisection_matches_the_laplace_closed_form():
    lower, upper, b, sens = 0.8, 0.1, 2.0, 0.5
    size = robustness.pixeldp_certified_size(lower, upper, b, sens, delta=0.0, mechanism="laplace")
    expected = 0.5 * math.log(lower / upper) * b / sens  # e^{2 eps} = lower/upper, eps = sens L / b
    assert math.isclose(size, expected, rel_tol=1e-6)
    # Gaussian: bounds close enough that the robustness condition, not the eps <= 1 validity cap, binds
    lower, upper = 0.6, 0.35
    g = robustness.pixeldp_certified_size(lower, upper, 1.0, 1.0, delta=1e-5, mechanism="gaussian")
    eps = robustness.pixeldp_epsilon(g, 1.0, 1.0, 1e-5)
    assert 0 < eps < 1
    assert robustness.pixeldp_robust(lower, upper, eps * (1 - 1e-6), 1e-5)
    assert not robustness.pixeldp_robust(lower, upper, eps * 1.001, 1e-5)


@pytest.mark.medium
def test_epsilon_agrees_with_an_independent_accountant():
    """Google's dp-accounting (a separate implementation from Opacus's) gives the same RDP epsilon for the
    steps the runner took, and a PLD epsilon close to the PRV one."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event, pld, rdp

    data = _toy(n=64)
    model = privacy.prepare_model(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)))
    cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=16, epochs=6)
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=64, batch_size=16, steps=24,
                       config=privacy.DPConfig(noise_multiplier=1.3, max_grad_norm=1.0, delta=1e-4))
    history = fit(dp.model, data, cfg, optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(16 / 64, dp_event.GaussianDpEvent(1.3)), 24)
    reference = rdp.RdpAccountant().compose(event).get_epsilon(1e-4)
    # the two libraries search different grids of RDP orders: the epsilons agree to the grid, 0.5%
    assert history[-1]["epsilon_rdp"] == pytest.approx(reference, rel=5e-3)
    pld_eps = pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(1e-4)
    assert history[-1]["epsilon_prv"] == pytest.approx(pld_eps, rel=0.02)
    assert dp_accounting is not None


@pytest.mark.medium
def test_secure_mode_uses_a_csprng_and_is_recorded():
    data = _toy(n=32)
    model = privacy.prepare_model(nn.Sequential(nn.Linear(5, 3)))
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=32, batch_size=8, steps=8,
                       config=privacy.DPConfig(noise_multiplier=1.0, secure_mode=True))
    torch.manual_seed(0)
    a = [dp.poisson_batch("cpu") for _ in range(5)]
    torch.manual_seed(0)
    b = [dp.poisson_batch("cpu") for _ in range(5)]
    assert any(not torch.equal(x, y) for x, y in zip(a, b))  # the public seed does not fix the batches
    history = fit(dp.model, data, TrainConfig(optimizer="sgd", lr=0.1, batch_size=8, epochs=1),
                  optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])
    assert history[-1]["secure_mode"] is True


def test_certify_selects_and_estimates_from_separate_samples(monkeypatch):
    """Cohen et al.: the class is picked from n0 draws and bounded from n fresh ones, never the same draws."""
    calls = []
    real = robustness.sample_counts

    def recording(model, x, sigma, n, *args, **kwargs):
        counts = real(model, x, sigma, n, *args, **kwargs)
        calls.append((n, counts.clone()))
        return counts

    monkeypatch.setattr(robustness, "sample_counts", recording)
    model = nn.Sequential(nn.Linear(2, 2))
    robustness.certify(model, torch.zeros(2), 0.5, 7, 300, 0.01, 2, generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in calls] == [7, 300] and int(calls[0][1].sum()) == 7 and int(calls[1][1].sum()) == 300


def test_dp_sgd_batches_are_poisson_samples():
    """Each example joins each batch independently with probability q: batch sizes are Binomial(n, q)
    (a fixed-size shuffled batch would have no variance) and every example's rate is q."""
    n, b = 400, 40
    model = privacy.prepare_model(nn.Sequential(nn.Linear(3, 2)))
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=n, batch_size=b, steps=1,
                       config=privacy.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    torch.manual_seed(0)
    draws = [dp.poisson_batch("cpu") for _ in range(2000)]
    sizes = torch.tensor([len(d) for d in draws], dtype=torch.float64)
    q = b / n
    assert float(sizes.mean()) == pytest.approx(n * q, rel=0.02)
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.15)  # sd of a sample variance: ~3%
    rate = torch.bincount(torch.cat(draws), minlength=n).double() / len(draws)
    assert float(rate.mean()) == pytest.approx(q, rel=0.02) and all(len(set(d.tolist())) == len(d) for d in draws)


def test_mim_matches_the_momentum_iterative_method():
    """Dong et al. 2018, written out: g <- mu g + grad / ||grad||_1; x <- clip_eps(x + (eps/T) sign(g))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(5, 6), torch.tensor([0, 1, 2, 0, 1])
    eps, steps, mu = 0.3, 6, 1.0
    adv, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        g = mu * g + grad / grad.abs().sum(1, keepdim=True)
        adv = (x + (adv.detach() + eps / steps * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    ours = robustness.mim(model, x, y, eps, steps=steps, decay=mu, clip=(0.0, 1.0))
    torch.testing.assert_close(ours, adv)
    plain = robustness.mim(model, x, y, eps, steps=steps, decay=0.0, clip=(0.0, 1.0))
    assert not torch.equal(plain, ours)  # the momentum changes the path on this model


def test_pgd_only_evaluates_inputs_in_the_data_range():
    """The random start is clipped too: the model never sees an input outside the data range."""
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            seen.append((float(x.detach().min()), float(x.detach().max())))
            return self.linear(x)

    x = torch.tensor([[0.0, 1.0, 0.02, 0.98]]).repeat(8, 1)
    adv = robustness.pgd(Recording(), x, torch.zeros(8, dtype=torch.long), 0.3, steps=3, clip=(0.0, 1.0),
                         generator=torch.Generator().manual_seed(1))
    assert seen and all(lo >= 0.0 and hi <= 1.0 for lo, hi in seen), seen
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


@pytest.mark.medium
def test_privacy_experiment_and_certify_cli(tmp_path, capsys):
    from backproplab.cli import main

    args = ["run", "privacy", "--set", "epsilons=8", "nonprivate=false", "adversarial=clean", "augment_sigmas=0.5",
            "epochs=1", "cert_examples=5", "cert_n=50", "cert_n0=10", "linf_eps=0.1", "l2_eps=0.5", "pgd_steps=2",
            "--seeds", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    run = tmp_path / "privacy" / "eps8-clean-aug0.5" / "seed0"
    import json

    final = json.loads((run / "final.json").read_text())
    assert 0 < final["epsilon_rdp"] <= 8.0 + 1e-6 and "pgd_linf_0.1" in final and final["certified"]
    assert "train_loss" not in final and final["noise_source"] == "the run's seed: reproducible, not for release"
    assert final["selection_privacy"] == "no selection on a validation split"
    assert all("train_loss" not in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert main(["certify", str(run), "--n", "50", "--n0", "10", "--examples", "5"]) == 0
    stem = "certify_sigma0.5_n50_n010_alpha0.001_examples5"
    assert (run / f"{stem}.md").exists() and (run / f"{stem}.png").exists()
    table = (run / f"{stem}.md").read_bytes()
    # another setting writes another table; the first is kept
    assert main(["certify", str(run), "--n", "60", "--n0", "10", "--examples", "5"]) == 0
    assert (run / f"{stem}.md").read_bytes() == table
    assert (run / "certify_sigma0.5_n60_n010_alpha0.001_examples5.md").exists()
    assert main(["certify", str(tmp_path / "nope")]) == 2
    # nonsense settings are refused before any certification, naming the argument
    for bad, name in ((["--sigma", "-1"], "--sigma"), (["--sigma", "0"], "--sigma"), (["--alpha", "2"], "--alpha"),
                      (["--n", "0"], "--n"), (["--n0", "0"], "--n0"), (["--examples", "0"], "--examples")):
        capsys.readouterr()
        assert main(["certify", str(run), *bad]) == 2
        assert capsys.readouterr().err.startswith(f"backproplab: {name} ")


_DP_TORCHRUN = """
import json, sys, torch
from torch import nn
from backproplab.data import load_dataset
from backproplab.methods import privacy
from backproplab.train import TrainConfig, fit, init_distributed, leave_distributed
rank, world = init_distributed("cpu")
data = load_dataset("digits", n_train=64)
fixed = torch.arange(0, 64, 4)  # 16 examples; under torchrun rank r takes its own share of them
results = {}
# both cases in one process group: each torchrun start costs seconds of imports on a 2-core machine
for case, noise in (("fixed", 0.0), ("fixed_noisy", 1.0), ("poisson", 1.0)):
    torch.manual_seed(0)
    model = privacy.prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)))
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.5), n=64, batch_size=16, steps=3,
                       config=privacy.DPConfig(noise_multiplier=noise, max_grad_norm=0.1))
    if case.startswith("fixed"):
        dp.poisson_batch = lambda device: fixed[fixed % world == rank]
    history = fit(dp.model, data, TrainConfig(optimizer="sgd", lr=0.5, batch_size=16, max_steps=3, eval_every=3),
                  optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])
    results[case] = {"state": dp.model._module.state_dict(), "epsilon": history[-1]["epsilon_rdp"]}
torch.save(results, f"{sys.argv[1]}.rank{rank}")
if world > 1:
    leave_distributed()  # the clean ending every multi-process test script shares (why: its docstring)
"""


@pytest.mark.slow
def test_dp_sgd_under_torchrun_equals_one_process(tmp_path, monkeypatch):
    """2 gloo ranks on one fixed batch equal one process on it, with the noise off and on (the noise is added
    once); both ranks end with the same weights; with Poisson sampling the accounting is the same."""
    import os
    import runpy
    import subprocess
    import sys

    script = tmp_path / "dp.py"
    script.write_text(_DP_TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    with monkeypatch.context() as m:  # the one-process reference in this process: a second start costs seconds
        m.setattr(sys, "argv", [str(script), str(tmp_path / "one.pt")])
        runpy.run_path(str(script), run_name="__main__")
    one = torch.load(tmp_path / "one.pt.rank0")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "two.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, two_rank1 = (torch.load(tmp_path / f"two.pt.rank{r}") for r in (0, 1))
    for case in one:  # the ranks agree
        for k, v in two[case]["state"].items():
            assert torch.equal(two_rank1[case]["state"][k], v), (case, k)
    # on the same examples, two ranks equal one process, with the noise off and on: the noise is drawn once
    # (rank 0, from the same seeded stream), not once per rank
    for case in ("fixed", "fixed_noisy"):
        for k, v in one[case]["state"].items():
            torch.testing.assert_close(two[case]["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"{case} {k}")
    assert two["poisson"]["epsilon"] == pytest.approx(one["poisson"]["epsilon"], rel=1e-12)
    assert two["poisson"]["epsilon"] > 0
    noisy, clean = two["poisson"]["state"], two["fixed"]["state"]
    assert any(not torch.equal(noisy[k], clean[k]) for k in clean)  # the noise did act


def test_dpsgd_refuses_make_private_outputs_with_a_clear_message_and_takes_its_module():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))),
                                         batch_size=8)
    module, dp_opt, _ = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                     noise_multiplier=1.0, max_grad_norm=1.0)
    config = privacy.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="make_private"):
        privacy.DPSGD(module, dp_opt, n=32, batch_size=8, steps=4, config=config)
    dp = privacy.DPSGD(module, torch.optim.SGD(module.parameters(), lr=0.1), n=32, batch_size=8, steps=4,
                       config=config)
    assert dp.model is module  # the GradSampleModule make_private built is used as it is


def test_certify_and_predict_take_a_batch_and_restore_the_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = torch.randn(4, 3)
    model.train()
    one_by_one = [robustness.certify(model, xi, 0.5, 20, 100, 0.01, 2, generator=torch.Generator().manual_seed(1))
                  for xi in x[:1]]
    g = torch.Generator().manual_seed(1)
    loop = [robustness.certify(model, xi, 0.5, 20, 100, 0.01, 2, generator=g) for xi in x]
    batch = robustness.certify(model, x, 0.5, 20, 100, 0.01, 2, generator=torch.Generator().manual_seed(1),
                               batched=True)
    assert batch == loop and batch[0] == one_by_one[0] and len(batch) == 4
    assert model.training  # left as the caller had it
    predictions = robustness.predict(model, x, 0.5, 100, 0.01, 2, generator=torch.Generator().manual_seed(2),
                                     batched=True)
    assert len(predictions) == 4 and model.training
    model.eval()
    robustness.predict(model, x[0], 0.5, 50, 0.01, 2)
    assert not model.training


# ---------------------------------------------------------------- the two clipping engines


def _train_dp(engine: str, model_fn, loss_terms=None, noise=1.0, epochs=3):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (120,), generator=g)
    data = Data("toy", x, y, x, y, 3)
    model = privacy.prepare_model(model_fn(), quiet=True).double()
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.2), n=120, batch_size=20, steps=18,
                       config=privacy.DPConfig(noise_multiplier=noise, max_grad_norm=0.5, engine=engine))
    history = fit(dp.model, data, TrainConfig(optimizer="sgd", lr=0.2, batch_size=20, epochs=epochs),
                  optimizer=dp.optimizer, step=dp.step(loss_terms), callbacks=[dp])
    return history[-1], [p.detach().clone() for p in dp.model._module.parameters()]


_MODELS = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3)),
    "cnn_groupnorm": lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                           nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3)),
}


@pytest.mark.medium
@pytest.mark.parametrize("adversarial", [False, True], ids=["clean", "pgd"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_ghost_engine_trains_exactly_as_opacus(name, adversarial):
    """Same seed, same noise stream, float64: the whole noisy run (Poisson batches, clipping, noise, SGD, and for
    adversarial training clean and PGD examples clipped together) ends at the same weights and epsilon."""
    torch.set_default_dtype(torch.float64)
    try:
        loss = (robustness.adversarial_loss(robustness.pgd, 1.0, eps=0.1, steps=2) if adversarial else None)
        ghost, w_ghost = _train_dp("ghost", _MODELS[name], loss)
        opacus, w_opacus = _train_dp("opacus", _MODELS[name], loss)
    finally:
        torch.set_default_dtype(torch.float32)
    assert ghost["epsilon_rdp"] == opacus["epsilon_rdp"] > 0
    for a, b in zip(w_ghost, w_opacus):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert any(not torch.equal(a, b) for a, b in zip(w_ghost, _train_dp_init(name)))  # it did train


def _train_dp_init(name):
    torch.manual_seed(0)
    return [p.detach().double() for p in privacy.prepare_model(_MODELS[name](), quiet=True).parameters()]


def test_the_noise_stream_is_the_seeds_and_secure_mode_has_no_seed():
    def noise(secure):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=10, batch_size=2, steps=1,
                             config=privacy.DPConfig(noise_multiplier=1.0, secure_mode=secure)).noise

    assert noise(False).seed == noise(False).seed
    assert noise(True).seed is None and noise(True).state_dict() == {"secure": True}  # nothing secret to save


@pytest.mark.parametrize("secure", [False, True])
def test_noise_drawn_on_first_read_is_the_stream_drawn_in_order(secure, monkeypatch):
    """Read in any order (last parameter first), the lazily drawn noise equals drawing every parameter's in
    order up front, and leaves the stream where that would: the next step's noise is unchanged too."""
    shapes = [(3, 4), (4,), (2, 3), (5,)]
    params = [torch.zeros(s) for s in shapes]

    def stream():
        if secure:  # the CSPRNG path, made reproducible for the comparison by known bytes
            source = torch.Generator().manual_seed(7)
            monkeypatch.setattr(privacy, "_random_bytes", lambda k: bytes(
                torch.randint(0, 256, (k,), generator=source, dtype=torch.uint8).tolist()))
        return privacy.GaussianNoise(1.5, seed=7, secure=secure)

    eager = stream()
    ref, ref_next = eager.draw(params, 0.5), eager.draw(params, 0.5)
    lazy = stream()
    got = lazy.in_order(params, 0.5)
    assert torch.equal(got[params[2]], ref[2])
    assert torch.equal(got[params[0]], ref[0])
    for p, r in zip(params, ref):
        assert torch.equal(got[p], r)
    assert list(got) == params and len(got) == 4 and got.get(torch.zeros(1)) is None
    for a, b in zip(lazy.draw(params, 0.5), ref_next):
        assert torch.equal(a, b)


def test_an_unknown_engine_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="engine must be one of"):
        privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=10, batch_size=2, steps=1,
                      config=privacy.DPConfig(noise_multiplier=1.0, engine="fast"))



def test_ghost_step_with_an_optimizer_over_some_parameters_clips_over_all():
    """An optimizer that holds only the head's weight: in one step it moves exactly as with an optimizer over
    every parameter (the clip factors count every parameter's gradient), and the rest does not move."""
    def run(head_weight_only: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        start = [p.detach().clone() for p in model.parameters()]
        params = [model[2].weight] if head_weight_only else model.parameters()
        dp = privacy.DPSGD(model, torch.optim.SGD(params, lr=0.5), n=40, batch_size=10, steps=1,
                           config=privacy.DPConfig(noise_multiplier=0.0, max_grad_norm=0.05))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
        fit(dp.model, Data("toy", x, y, x, y, 3), TrainConfig(optimizer="sgd", lr=0.5, batch_size=10, max_steps=1),
            optimizer=dp.optimizer, step=dp.step(), callbacks=[dp])
        return start, [p.detach().clone() for p in model.parameters()]

    start, some = run(True)
    _, every = run(False)
    for i in (0, 1, 3):  # the first layer and the head's bias
        assert torch.equal(some[i], start[i])
    assert not torch.equal(some[2], start[2])
    torch.testing.assert_close(some[2], every[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("engine", privacy.ENGINES)
def test_a_frozen_parameter_does_not_step_on_a_stale_gradient(engine):
    """A parameter frozen after it got a gradient (fine-tuning a head, say) stays where it is: the DP step
    drops that gradient, as zero_grad(set_to_none=True) does, and moves every trainable parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    F.cross_entropy(model(torch.randn(3, 5)), torch.tensor([0, 1, 2])).backward()  # every .grad now set
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainable = [p.detach().clone() for p in list(model.parameters())[1:]]
    data = _toy(n=8)
    dp = privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.5), n=8, batch_size=8, steps=1,
                       config=privacy.DPConfig(noise_multiplier=0.5, max_grad_norm=1.0, engine=engine))
    dp.poisson_batch = lambda device: torch.arange(8)

    class State:
        pass

    state = State()
    state.data, state.loss_fn, state.optimizer, state.net = data, F.cross_entropy, dp.optimizer, dp.model
    dp.step()(Batch(data.x_train, data.y_train, torch.arange(8)), state)
    assert torch.equal(model[0].weight, frozen)
    assert all(not torch.equal(p, q) for p, q in zip(list(model.parameters())[1:], trainable))


def test_dp_noise_and_sampling_come_from_the_runs_seed_streams():
    """#36 item 5: ``DPSGD(seed=s)`` draws its noise from ``streams.derive(s, "dp-noise")`` and rank 0's Poisson
    sampling from ``streams.derive(s, "dp-sampling", 0)``, whatever state the global generator is in; with
    ``seed=None`` the seed is ``torch.initial_seed()``, the one given to ``torch.manual_seed``."""
    from backproplab.streams import derive, derive_seed

    def make(seed):
        model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        return privacy.DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), n=32, batch_size=8, steps=4,
                             config=privacy.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0), seed=seed)

    torch.manual_seed(123)
    dp = make(7)
    torch.manual_seed(456)
    again = make(7)
    for d in (dp, again):
        assert d.noise.seed == derive_seed(7, "dp-noise")
        assert torch.equal(d.sampler.get_state(), derive(7, "dp-sampling", 0).get_state())
    noise = dp.noise.generator_on(torch.device("cpu"))
    assert torch.equal(torch.randn(5, generator=noise), torch.randn(5, generator=derive(7, "dp-noise")))
    torch.manual_seed(5)
    assert make(None).noise.seed == derive_seed(5, "dp-noise") != derive_seed(7, "dp-noise")

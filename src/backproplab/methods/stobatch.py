"""StoBatch: scalable differential privacy with certified robustness in adversarial learning.

Phan, Thai, Hu, Jin, Sun, Dou, ICML 2020 (arXiv 1903.09822). Two modes, one network and one training step.

The network (:class:`StoBatchNet`): a tied-weight convolutional auto-encoder first layer (encoder conv W1,
stride 2; decoder its transpose), a conv block, a hidden layer normalised then clipped to [-1, 1], an output
layer. PixelDP-style certification draws Laplace noise on the latent h1.

The objective of one example: the auto-encoder's first-order Taylor reconstruction loss
R~ = sum_j [ln 2 + (1/2 - x_j) z_j] (z the tied decoder's pre-activation; functional mechanism) plus the
second-order Taylor polynomial of the per-logit sigmoid cross-entropy, T(z) = ln 2 + (1/2 - y) z + z^2 / 8,
on benign and adversarial inputs, (T_benign + alpha T_adv) / (1 + alpha), alpha = 1.5. Adversarial examples
(I-FGSM / MIM / PGD, l-inf, a random size in (0, mu_max] each step) are crafted against the noisy model.
Stochastic batches: the training set is cut once into fixed disjoint batches of L examples; each step
``workers`` workers (torch.distributed ranks, or a loop in one process) each take one batch and their
updates are averaged.

**Corrected mode** (default, ``paper_compat=False``) releases, at every visit of a batch, the sum of the
examples' gradients of that objective, each clipped to l2 norm C, plus Gaussian noise of standard deviation
2 C sigma on every parameter, divided by the nominal L. Its guarantee, (epsilon, delta)-DP for datasets
that differ in one example (one image or one label replaced), is proved step by step in
``docs/stobatch_privacy.md``; the code below cites the proof's steps as "[P1]" ... "[P7]". sigma is chosen
with Opacus's RDP accountant for the planned number of visits of a batch, and :meth:`StoBatch.epsilon_spent`
composes the visits actually made. The paper's own analysis (functional mechanism on the input, the latent
and the output layer's linear coefficients, one draw shared by a batch and reused) cannot give a finite
epsilon for this network; the proof document says why.

**Paper mode** (``paper_compat=True``) follows the authors' TensorFlow code and carries no guarantee
(:meth:`StoBatch.epsilon_spent` is infinite): one Laplace draw for the whole run, shared by every example
and batch, on the input (scale Delta2 / (L eps2')), the latent (2 Delta2 / (L eps2')) and the output
weights' linear coefficients (K times a draw of Lap(Delta3 / (eps3 L)), Delta3 = 2 (hk + 1), as the authors'
broadcast over the K classes makes it; the output bias is not noised), with
Delta2 = C_in (H W + 2) k^2, gamma = 2 Delta2 / (L ||W1||) (||W1|| measured at initialisation),
gamma_x = Delta2 / L, eps2' = eps2 / (1 + 1/gamma + 1/gamma_x), in the authors' input units (pixels mapped to
[-1, 1]); the auto-encoder (W1 with a bias b1 and its own BatchNorm, clip and latent noise; nearest-neighbour
upsampling and W1 transposed to reconstruct; ReLU) minimises the elementwise |ln 2 + (1/2 - x) r| on the benign
and the adversarial inputs (:meth:`StoBatchNet.paper_reconstruction_loss`); W1 and b1 are trained by the
auto-encoder only; the benign path carries the input noise; BatchNorm after relu(h1 + noise) and before the
hidden clip; adversarial examples from their ensemble (the batch in thirds attacked
by I-FGSM, MIM and PGD at one random size per step, crafted in inference mode from the next batch); their
certification procedure (:func:`certify_pixeldp_paper`) and their evaluation (BatchNorm on the test batch's
statistics, under the training draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _io
from ..dist import rank_and_world, world_size
from ..streams import derive, derive_seed
from ..train import loss_step

LN2 = math.log(2.0)


# ---------------------------------------------------------------- Taylor losses


def taylor_reconstruction(z: Tensor, x: Tensor) -> Tensor:
    """First-order Taylor expansion around z = 0 of the logistic cross-entropy of reconstructing x in [0, 1]
    from pre-activations z: per element ln 2 + (1/2 - x) z, summed over elements, averaged over the batch.

    Example:
        >>> import torch
        >>> z, x = torch.tensor([[0.05, -0.1]]), torch.tensor([[1.0, 0.0]])
        >>> abs(float(taylor_reconstruction(z, x) - exact_reconstruction(z, x))) < 2e-3     # second-order error z^2/8
        True

    References:
        Phan et al., "Scalable differential privacy with certified robustness in adversarial learning", ICML 2020.
    """
    return (LN2 + (0.5 - x) * z).flatten(1).sum(1).mean()


def exact_reconstruction(z: Tensor, x: Tensor) -> Tensor:
    """The exact logistic cross-entropy x softplus(-z) + (1 - x) softplus(z), same reduction.

    Example:
        >>> import torch
        >>> z, x = torch.randn(3, 4), torch.rand(3, 4)
        >>> bce = torch.nn.functional.binary_cross_entropy_with_logits(z, x, reduction="sum") / 3
        >>> torch.allclose(exact_reconstruction(z, x), bce)
        True
    """
    return (x * F.softplus(-z) + (1 - x) * F.softplus(z)).flatten(1).sum(1).mean()


def taylor_sigmoid_ce(z: Tensor, y_onehot: Tensor) -> Tensor:
    """Second-order Taylor expansion around z = 0 of the per-logit sigmoid cross-entropy:
    ln 2 + (1/2 - y) z + z^2 / 8, summed over logits, averaged over the batch.

    Example:
        >>> import torch
        >>> z, y = torch.tensor([[0.1, -0.2]]), torch.tensor([[1.0, 0.0]])
        >>> exact = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")
        >>> abs(taylor_sigmoid_ce(z, y).item() - exact.item()) < 1e-3       # close to 0 the expansion is tight
        True

    References:
        Phan, Thai, Hu, Jin, Sun and Dou, "Scalable differential privacy with certified robustness in adversarial
        learning", ICML 2020, Section 3; Zhang, Xiao, Yang, Winslett, "Functional mechanism", VLDB 2012.
    """
    return (LN2 + (0.5 - y_onehot) * z + z.pow(2) / 8).sum(1).mean()


def exact_sigmoid_ce(z: Tensor, y_onehot: Tensor) -> Tensor:
    """The per-logit sigmoid cross-entropy, summed over logits and averaged over the batch: what
    :func:`taylor_sigmoid_ce` expands to second order.

    Example:
        >>> import torch
        >>> z, y = torch.tensor([[0.3, -1.0]]), torch.tensor([[1.0, 0.0]])
        >>> torch.allclose(exact_sigmoid_ce(z, y),
        ...                torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum"))
        True
    """
    return F.binary_cross_entropy_with_logits(z, y_onehot, reduction="none").sum(1).mean()


# ---------------------------------------------------------------- noise scales


def spectral_norm_w1(weight: Tensor) -> Tensor:
    """Largest singular value of the first-layer kernel reshaped to (k k C_in, C_out).

    Example:
        >>> import torch
        >>> w = torch.randn(4, 2, 3, 3)
        >>> ref = torch.linalg.svdvals(w.permute(2, 3, 1, 0).reshape(-1, 4))[0]
        >>> torch.allclose(spectral_norm_w1(w), ref)
        True
    """
    c_out = weight.shape[0]
    if not torch.isfinite(weight).all():
        raise FloatingPointError("the first-layer kernel W1 has non-finite entries: training diverged; lower the "
                                 "learning rate or raise the privacy budget (the noise scales grow as 1/epsilon)")
    return torch.linalg.matrix_norm(weight.detach().permute(2, 3, 1, 0).reshape(-1, c_out), ord=2)


@dataclass(frozen=True)
class NoiseScales:
    """The scales :func:`noise_scales` computes: the sensitivities and the Laplace scales of the input, latent and
    output-coefficient noise (see the module docstring).

    Example:
        >>> s = noise_scales(eps2=1.0, eps3=1.0, batch=64, w1_norm=1.0, in_channels=1, latent_hw=4, kernel=3,
        ...                  hidden=256)
        >>> s.latent_scale == 2 * s.input_scale, s.output_scale == s.delta3 / 64
        (True, True)
    """
    delta2: float
    gamma: float
    gamma_x: float
    eps2_prime: float
    input_scale: float  # Laplace scale b of the input noise
    latent_scale: float
    delta3: float
    output_scale: float  # Laplace scale of the label-dependent coefficients


def noise_scales(eps2: float, eps3: float, batch: int, w1_norm: float, in_channels: int, latent_hw: int,
                 kernel: int, hidden: int) -> NoiseScales:
    """The StoBatch formulas (see the module docstring) for batch size L = ``batch``.

    Example:
        >>> s = noise_scales(eps2=2.0, eps3=2.0, batch=64, w1_norm=1.0, in_channels=1, latent_hw=4, kernel=3, hidden=10)
        >>> s.delta2, s.delta3                                   # C (H + 2) k^2, and 2 (hidden + 1)
        (54, 22)
        >>> half = noise_scales(eps2=4.0, eps3=4.0, batch=64, w1_norm=1.0, in_channels=1, latent_hw=4, kernel=3,
        ...                     hidden=10)
        >>> abs(half.input_scale - s.input_scale / 2) < 1e-12         # twice the budget, half the noise
        True

    References:
        Phan et al., ICML 2020 (arXiv:1903.09822), Section 4 and Algorithm 1.
    """
    delta2 = in_channels * (latent_hw + 2) * kernel**2
    gamma = 2 * delta2 / (batch * w1_norm)
    gamma_x = delta2 / batch
    eps2p = eps2 / (1 + 1 / gamma + 1 / gamma_x)
    delta3 = 2 * (hidden + 1)  # the bias is the weight of a constant input 1
    return NoiseScales(delta2, gamma, gamma_x, eps2p, delta2 / (batch * eps2p), 2 * delta2 / (batch * eps2p),
                       delta3, delta3 / (eps3 * batch))


def laplace(shape, scale: float, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Laplace(0, scale) samples by inverse CDF, in float64 with u kept off the endpoint: a float32
    uniform hits exactly 0 about once in 2^24 draws, which would give an infinite sample.

    Example:
        >>> import torch
        >>> x = laplace((200_000,), scale=2.0, generator=torch.Generator().manual_seed(0))
        >>> abs(x.abs().mean().item() - 2.0) < 0.02, bool(torch.isfinite(x).all())    # E|x| = scale
        (True, True)
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(2.0**-53) - 0.5
    return (-scale * u.sign() * torch.log1p(-2 * u.abs())).to(device=device, dtype=torch.get_default_dtype())


# ---------------------------------------------------------------- the network


class StoBatchNet(nn.Module):
    """Tied-weight conv auto-encoder first layer (k x k, stride 2) + conv block + hidden layer (normalised, then
    clipped to [-1, 1]) + output layer. Inputs are pixels in [0, 1].

    ``norm="group"`` (corrected mode): GroupNorm after the conv, LayerNorm before the hidden clip, both per
    example; the encoder has no bias. ``norm="batch"`` (paper mode, the authors' code): the encoder has a bias,
    BatchNorm after relu(h1), after the conv and immediately before the hidden clip, and the model maps pixels
    to [-1, 1] before anything else (the authors' input range: their noise scales are in those units). Without a
    normalisation before the hidden clip, a shared latent-noise offset pushes every hidden unit past +-1 within
    a few dozen steps and the clipped layer stops passing gradients.

    Example:
        >>> net = StoBatchNet(norm="batch")
        >>> net(torch.rand(4, 1, 8, 8)).shape, net.latent_shape
        (torch.Size([4, 10]), torch.Size([16, 4, 4]))
    """

    def __init__(self, input_shape=(1, 8, 8), num_classes: int = 10, latent: int = 16, width: int = 32,
                 hidden: int = 64, kernel: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "batch"):
            raise ValueError(f"norm={norm!r}: use 'group' (corrected mode, per-example) or 'batch' (paper mode)")
        c, h, w = input_shape
        batch = norm == "batch"
        self.kernel, self.in_channels, self.signed_inputs = kernel, c, batch
        self.encoder = nn.Conv2d(c, latent, kernel, stride=2, padding=kernel // 2, bias=batch)
        with torch.no_grad():
            self.latent_shape = self.encoder(torch.zeros(1, c, h, w)).shape[1:]
        self.ae_norm = nn.BatchNorm2d(latent) if batch else nn.Identity()  # the authors' auto-encoder BatchNorm
        self.latent_norm = nn.BatchNorm2d(latent) if batch else nn.Identity()
        self.conv = nn.Conv2d(latent, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width) if batch else nn.GroupNorm(4, width)
        self.hidden = nn.Linear(width * self.latent_shape[1] * self.latent_shape[2], hidden)
        self.hidden_norm = nn.BatchNorm1d(hidden) if batch else nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, num_classes)
        self.input_shape = tuple(input_shape)

    @property
    def latent_hw(self) -> int:
        return int(self.latent_shape[1] * self.latent_shape[2])

    def model_inputs(self, x: Tensor, input_noise: Tensor | None = None) -> Tensor:
        """Pixels in [0, 1] as the first layer sees them: mapped to [-1, 1] in paper mode, then the input noise
        (which is calibrated in those units) added."""
        if self.signed_inputs:
            x = 2 * x - 1
        return x if input_noise is None else x + input_noise

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode_preactivation(self, h: Tensor) -> Tensor:
        """The tied decoder's pre-activation: conv_transpose with the encoder's weights."""
        out = F.conv_transpose2d(h, self.encoder.weight, stride=2, padding=self.kernel // 2,
                                 output_padding=self.input_shape[1] - ((h.shape[2] - 1) * 2 - 2 * (self.kernel // 2)
                                                                       + self.kernel))
        return out

    def reconstruct(self, x: Tensor) -> Tensor:
        """The auto-encoder's pre-activation reconstruction of ``x`` (no noise)."""
        return self.decode_preactivation(self.encode(x))

    def paper_reconstruction_loss(self, x_model: Tensor, latent_noise: Tensor) -> Tensor:
        """Paper mode's auto-encoder loss on inputs already in the model's units (noise included), as the
        authors' ``EncLayer.get_train_ops2`` computes it: h = clip(BN(relu(W1 * x + b1)), -1, 1) + latent noise;
        the reconstruction r = relu(conv(nearest-upsample(h), W1 transposed), stride 1, 'same'); per element
        |ln 2 + (1/2 - x) r| (their first-order Taylor form of the logistic loss at r >= 0, |.| elementwise),
        summed over the elements and averaged over the batch."""
        h = torch.clamp(self.ae_norm(F.relu(self.encoder(x_model))), -1.0, 1.0) + latent_noise
        up = F.interpolate(h, size=tuple(self.input_shape[1:]), mode="nearest")
        r = F.relu(F.conv2d(up, self.encoder.weight.permute(1, 0, 3, 2), padding="same"))
        return (LN2 + (0.5 - x_model) * r).abs().flatten(1).sum(1).mean()

    def head_hidden(self, h1: Tensor) -> Tensor:
        h = F.relu(self.norm(self.conv(self.latent_norm(F.relu(h1)))))
        return torch.clamp(self.hidden_norm(self.hidden(h.flatten(1))), -1.0, 1.0)  # clipped: Delta3 = 2 (hk + 1)

    def forward(self, x: Tensor, latent_noise: Tensor | None = None, input_noise: Tensor | None = None) -> Tensor:
        h1 = self.encode(self.model_inputs(x, input_noise))
        if latent_noise is not None:
            h1 = h1 + latent_noise
        return self.out(self.head_hidden(h1))


# ---------------------------------------------------------------- batches and the training step


def disjoint_batches(n: int, batch: int, seed: int = 0) -> list[Tensor]:
    """The training set cut once into fixed disjoint batches (a seeded permutation); the last may be smaller.

    Example:
        >>> import torch
        >>> batches = disjoint_batches(10, 4)
        >>> [len(b) for b in batches], sorted(torch.cat(batches).tolist()) == list(range(10))
        ([4, 4, 2], True)
    """
    perm = torch.randperm(n, generator=derive(seed, "stobatch-batches"))
    return [perm[s:s + batch] for s in range(0, n, batch)]


def ifgsm_random_size(model: StoBatchNet, x: Tensor, y: Tensor, max_size: float, steps: int, latent_noise: Tensor,
                      generator: torch.Generator | None = None) -> Tensor:
    """I-FGSM (l-inf) against the noisy model, with an attack size drawn uniformly in (0, max_size].

    Example:
        >>> import torch
        >>> net = StoBatchNet()
        >>> x, y = torch.rand(4, *net.input_shape), torch.randint(0, 10, (4,))
        >>> noise = torch.zeros(4, *net.latent_shape)
        >>> adv = ifgsm_random_size(net, x, y, 0.2, 3, noise, generator=torch.Generator().manual_seed(0))
        >>> size = float(torch.rand((), generator=torch.Generator().manual_seed(0))) * 0.2    # the size it drew
        >>> bool((adv - x).abs().max() <= size + 1e-6), bool(adv.min() >= 0 and adv.max() <= 1)
        (True, True)

    References:
        Kurakin, Goodfellow and Bengio, "Adversarial examples in the physical world", ICLR workshop 2017 (I-FGSM).
    """
    size = float(torch.rand((), generator=generator)) * max_size
    step = size / max(steps, 1)
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv, latent_noise), y)
            (g,) = torch.autograd.grad(loss, adv)
        adv = (x + (adv.detach() + step * g.sign() - x).clamp(-size, size)).clamp(0, 1).detach()
    return adv


def ensemble_attack(model: StoBatchNet, x: Tensor, y: Tensor, max_size: float, steps: int, latent_noise: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """The authors' training ensemble: one attack size drawn uniformly in (0, max_size] per step, the batch cut in
    thirds attacked by I-FGSM, MIM and PGD with a random start (Madry et al.), step max_size / steps, l-inf,
    against the noisy model, pixels kept in [0, 1].

    Example:
        Every attacked input stays within the one size drawn for the step (the generator's first draw times
        ``max_size``) and within the pixel range:

        >>> import torch
        >>> net = StoBatchNet()
        >>> x, y = torch.rand(6, *net.input_shape), torch.randint(0, 10, (6,))
        >>> adv = ensemble_attack(net, x, y, max_size=0.3, steps=3, latent_noise=torch.zeros(1, *net.latent_shape),
        ...                       generator=torch.Generator().manual_seed(0))
        >>> size = float(torch.rand((), generator=torch.Generator().manual_seed(0))) * 0.3
        >>> bool((adv - x).abs().max() <= size + 1e-6), bool(adv.min() >= 0 and adv.max() <= 1), adv.shape == x.shape
        (True, True, True)

    References:
        Kurakin et al. 2017 (I-FGSM); Dong et al., CVPR 2018 (MIM); Madry et al., ICLR 2018 (PGD).
    """
    from .robustness import mim, pgd

    size = float(torch.rand((), generator=generator)) * max_size
    step = max_size / max(steps, 1)
    if steps < 1 or size == 0:
        return x.detach()

    class Noisy(nn.Module):
        def forward(self, inputs: Tensor) -> Tensor:
            return model(inputs, latent_noise.expand(len(inputs), *latent_noise.shape[1:]))

    noisy = Noisy()
    parts = torch.arange(len(x)).chunk(3)
    out = x.clone()
    for part, attack in zip(parts, ("ifgsm", "mim", "pgd")):
        xs, ys = x[part], y[part]
        if attack == "mim":
            out[part] = mim(noisy, xs, ys, size, steps=steps, clip=(0.0, 1.0))
        else:
            out[part] = pgd(noisy, xs, ys, size, steps=steps, step_size=step, random_start=attack == "pgd",
                            clip=(0.0, 1.0), generator=generator)
    return out.detach()


@dataclass
class StoBatchConfig:
    """StoBatch's settings (Phan et al. 2020): the budgets eps2 (auto-encoder) and eps3 (classifier), the disjoint
    batch size L and the workers averaged per step, the adversarial weight and attack, the W1 bound, and the mode
    (``paper_compat``: the authors' code; otherwise the corrected mechanism with its own noise).

    Example:
        >>> cfg = StoBatchConfig(eps2=2.0, eps3=2.0, batch=64)
        >>> cfg.eps2 + cfg.eps3, cfg.paper_compat, cfg.secure_mode
        (4.0, False, False)
    """
    eps2: float = 0.5  # corrected mode: the target is epsilon = eps2 + eps3 (with delta); paper mode: its split
    eps3: float = 0.5
    batch: int = 128  # L
    workers: int = 2  # disjoint batches averaged per step (torch.distributed ranks, or a loop)
    alpha: float = 1.5  # weight of the adversarial Taylor term
    attack_size: float = 0.2  # mu_max of the training attacks (l-inf, inputs in [0, 1])
    attack_steps: int = 3
    w1_norm: float = 1.0  # corrected mode: W1 projected to spectral norm <= this (bounds the certificate's scale)
    ae_weight: float = 1.0  # weight of the auto-encoder's Taylor loss in the total (the paper adds them)
    paper_compat: bool = False
    seed: int = 0
    # corrected mode only
    steps: int | None = None  # planned training steps: sigma is calibrated for the visits they make
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # C, the l2 clip of each example's gradient
    latent_scale: float = 0.3  # Laplace scale of the latent noise (certification only; data-independent)
    secure_mode: bool = False  # privacy noise from the OS CSPRNG instead of the run's (public) seed


class StoBatch:
    """The StoBatch training step for the loop (with ``optimizer="sgd"``/``"adam"`` on the model).

    Corrected mode: each visit of a disjoint batch releases :meth:`release` (clipped per-example gradients of
    the StoBatch objective plus Gaussian noise, ``docs/stobatch_privacy.md``); pass ``callbacks=[sto]`` to
    ``fit`` so every evaluation row records ``epsilon_spent`` and withholds the un-noised training loss.
    Paper mode: the authors' functional mechanism (:meth:`batch_loss`), no guarantee.

    Under torch.distributed, rank r takes disjoint batch (step * world + r) mod B and the released gradients
    are averaged over ranks; in one process the ``workers`` batches are looped over and averaged.

    Example:
        >>> net = StoBatchNet()
        >>> sto = StoBatch(net, n=256, config=StoBatchConfig(batch=32, steps=40, eps2=1.0, eps3=1.0))
        >>> round(sto.epsilon_spent(40), 1), sto.visits(40)[:3]
        (2.0, [10, 10, 10])

    References:
        Phan et al., "Scalable differential privacy with certified robustness in adversarial learning",
        ICML 2020; Abadi et al., "Deep learning with differential privacy", CCS 2016; Mironov, "Renyi
        differential privacy", CSF 2017.
    """

    def __init__(self, model: StoBatchNet, n: int, config: StoBatchConfig):
        _io.require("opacus", "dp", "StoBatch (its privacy accountant)")
        self.model, self.config = model, config
        self.batches = disjoint_batches(n, config.batch, config.seed)
        if config.paper_compat:
            if len(self.batches) > 1 and len(self.batches[-1]) < config.batch:
                self.batches.pop()  # the authors' batches all hold L examples (BatchNorm needs more than one)
            self.scales = noise_scales(config.eps2, config.eps3, config.batch,
                                       float(spectral_norm_w1(model.encoder.weight)), model.in_channels,
                                       model.latent_hw, model.kernel, model.hidden.out_features)
            self.noise_multiplier = 0.0
            self._paper_noise: tuple[Tensor, Tensor, Tensor] | None = None
            return
        from .privacy import PrivacyError, check_private

        check_private(model)  # [P2] no layer mixes the examples of a batch, none keeps statistics of the data
        if config.steps is None or config.steps < 1:
            raise PrivacyError(f"StoBatchConfig(steps={config.steps}): the corrected mode calibrates its noise for "
                               "the planned number of training steps; pass steps=privacy.planned_steps(train_config, "
                               "n) (the loop's steps)")
        if not config.max_grad_norm > 0 or not config.delta > 0 or not config.eps2 + config.eps3 > 0:
            raise PrivacyError(f"StoBatchConfig(max_grad_norm={config.max_grad_norm}, delta={config.delta}, "
                               f"eps2 + eps3={config.eps2 + config.eps3}): each must be > 0")
        self.scales = replace_latent_scale(noise_scales(1.0, 1.0, config.batch, config.w1_norm, model.in_channels,
                                                        model.latent_hw, model.kernel, model.hidden.out_features),
                                           config.latent_scale)
        from opacus.accountants.utils import get_noise_multiplier

        # [P6] sigma for max-visits Gaussian releases of sensitivity 2C, noise 2C sigma: RDP at q = 1; under
        # torch.distributed each of the world's ranks visits one batch per step (``workers`` is not used)
        world = world_size()
        self.noise_multiplier = float(get_noise_multiplier(
            target_epsilon=self.epsilon_claimed(), target_delta=config.delta, sample_rate=1.0,
            steps=max(self.visits(config.steps, world)), accountant="rdp", epsilon_tolerance=0.005))
        project_w1(model, config.w1_norm)

    def epsilon_claimed(self) -> float:
        """The stated budget: eps2 + eps3 (corrected mode: with ``delta``)."""
        return self.config.eps2 + self.config.eps3

    def visits(self, steps: int, world: int = 1) -> list[int]:
        """How often each disjoint batch was used in ``steps`` steps (``world`` ranks, or ``workers`` batches)."""
        per_step = world if world > 1 else self.config.workers
        full, rest = divmod(steps * per_step, len(self.batches))
        return [full + (i < rest) for i in range(len(self.batches))]

    def epsilon_spent(self, steps: int, world: int = 1) -> float:
        """The epsilon (at ``delta``) of what the code released in ``steps`` steps.

        Corrected mode [P7]: an example is in one disjoint batch, so only that batch's releases depend on it
        (parallel composition); each release is a Gaussian mechanism of l2 sensitivity 2C and noise 2C sigma,
        and the V visits of the most visited batch compose (RDP, Opacus's accountant, sample rate 1). Paper mode:
        infinite, since one draw shared by all batches and visits cancels in the difference of two releases.
        """
        if self.config.paper_compat:
            return math.inf
        v = max(self.visits(steps, world))
        if v == 0:
            return 0.0
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
        from opacus.accountants.rdp import RDPAccountant

        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = compute_rdp(q=1.0, noise_multiplier=self.noise_multiplier, steps=v, orders=orders)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=self.config.delta)[0])

    # ---------------------------------------------------------------- corrected mode

    def example_loss(self, params: dict[str, Tensor], x: Tensor, onehot: Tensor, x_adv: Tensor, latent: Tensor,
                     latent_adv: Tensor) -> Tensor:
        """[P3] The StoBatch objective of ONE example (unbatched tensors), a function of the parameters: the
        auto-encoder's Taylor reconstruction loss plus the benign and adversarial Taylor classification losses
        under the example's own latent noise."""
        from torch.func import functional_call

        m, cfg = self.model, self.config

        def call(method: str, *args: Tensor) -> Tensor:
            return functional_call(_Method(m, method), {f"m.{k}": v for k, v in params.items()}, args)

        x1, xa1 = x.unsqueeze(0), x_adv.unsqueeze(0)
        z = call("reconstruct", x1)
        loss_ae = taylor_reconstruction(z, x1)
        onehot = onehot.unsqueeze(0)
        benign = taylor_sigmoid_ce(call("forward", x1, latent.unsqueeze(0)), onehot)
        adversarial = taylor_sigmoid_ce(call("forward", xa1, latent_adv.unsqueeze(0)), onehot)
        return cfg.ae_weight * loss_ae + (benign + cfg.alpha * adversarial) / (1 + cfg.alpha)

    def release(self, batch_index: int, step: int, x: Tensor, y: Tensor, num_classes: int,
                noise: bool = True) -> list[Tensor]:
        """What one visit of disjoint batch ``batch_index`` at ``step`` releases, one tensor per parameter
        (the proof's mechanism M, steps [P1]-[P5]): (sum_i clip_C(g_i) + N(0, (2 C sigma)^2 I)) / L.
        ``noise=False`` leaves out the Gaussian term (for tests that hold the noise fixed)."""
        m, cfg = self.model, self.config
        if cfg.paper_compat:
            raise ValueError("release() is the corrected mode's mechanism; paper mode trains on batch_loss()")
        if len(x) > cfg.batch:
            raise ValueError(f"a batch of {len(x)} examples for L = {cfg.batch}: the released sum would have more "
                             "than one batch's examples under one noise draw")
        # [P1] data-independent draws: the attack's size and start, and each example's latent noise
        g = derive(cfg.seed, "stobatch-draw", step, batch_index)  # this batch's visit's own stream
        latent = laplace((len(x), *m.latent_shape), self.scales.latent_scale, g, x.device)
        latent_adv = laplace((len(x), *m.latent_shape), self.scales.latent_scale, g, x.device)
        # [P2] each adversarial example is a function of its own example and the public parameters
        x_adv = ifgsm_random_size(m, x, y, cfg.attack_size, cfg.attack_steps, latent, g)
        names = [k for k, p in m.named_parameters() if p.requires_grad]
        params = {k: p.detach() for k, p in m.named_parameters() if p.requires_grad}
        # [P3] per-example gradients of the per-example objective (vmap over examples: none sees another)
        onehot = F.one_hot(y, num_classes).to(x.dtype)
        per_example = torch.func.vmap(torch.func.grad(self.example_loss), in_dims=(None, 0, 0, 0, 0, 0))(
            params, x, onehot, x_adv, latent, latent_adv)
        grads = [per_example[k].flatten(1) for k in names]
        # [P4] clip each example's whole gradient to l2 norm <= C
        norms = torch.cat(grads, 1).norm(dim=1)
        factor = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        summed = [(gk * factor[:, None]).sum(0).view_as(params[k]) for gk, k in zip(grads, names)]
        # [P5] Gaussian noise of std 2 C sigma on every coordinate of every parameter, then / L (public)
        if noise:  # DP-SGD's noise source: the visit's own stream (seed, step, batch), or the OS CSPRNG (secure_mode)
            from .privacy import GaussianNoise

            GaussianNoise(2 * cfg.max_grad_norm * self.noise_multiplier,
                          derive_seed(cfg.seed, "stobatch-noise", step, batch_index),
                          secure=cfg.secure_mode).add_to(summed)
        return [t / cfg.batch for t in summed]

    @property
    def noise_source(self) -> str:
        return ("operating-system CSPRNG (secure_mode)" if self.config.secure_mode
                else "the run's seed: reproducible, not for release")

    def on_eval(self, state) -> None:
        """The loop's callback: the training loss is not released (it is computed without noise); the epsilon
        spent so far is recorded."""
        row = state.history[-1]
        for key in [k for k in row if k.startswith("train_")]:
            del row[key]
        row["train_metrics"] = "withheld (computed on private data without noise)"
        world = world_size()
        row["epsilon_spent"] = self.epsilon_spent(state.step, world)
        row["epsilon_claimed"] = self.epsilon_claimed()
        if not self.config.paper_compat:
            row["noise_multiplier"] = self.noise_multiplier
            row["noise_source"] = self.noise_source

    # ---------------------------------------------------------------- paper mode

    def noise(self, shape_x, device) -> tuple[Tensor, Tensor, Tensor]:
        """Paper mode: (input noise, latent noise, output-weight noise), one draw for the whole run, shared by
        every example, batch and visit (the authors' code draws them once)."""
        if self._paper_noise is None:
            self.redraw(derive(self.config.seed, "stobatch-training-draw"), device)
        return self._paper_noise

    def redraw(self, generator: torch.Generator, device=None) -> None:
        """Paper mode: replace the run's one draw by a fresh one from ``generator`` (an audit's independent runs
        of the mechanism); every later batch, visit and evaluation uses it."""
        s, m = self.scales, self.model
        self._paper_noise = (laplace((1, *m.input_shape), s.input_scale, generator, device),
                             laplace((1, *m.latent_shape), s.latent_scale, generator, device),
                             laplace(m.out.weight.shape, s.output_scale, generator, device))

    def batch_loss(self, net: nn.Module, x: Tensor, y: Tensor, batch_index: int, step: int,
                   num_classes: int, x_other: Tensor | None = None, y_other: Tensor | None = None) -> Tensor:
        """Paper mode's loss of a batch; the adversarial examples are crafted (in inference mode) from
        ``x_other``/``y_other``, the next batch, as the authors' code takes them from other batches."""
        m, cfg = self.model, self.config
        nx, nh, nw = self.noise(x.shape, x.device)
        # 1. adversarial examples against the noisy model, in inference mode, from another batch
        x_src, y_src = (x, y) if x_other is None else (x_other, y_other)
        g = derive(cfg.seed, "stobatch-draw", step, batch_index)  # this batch's visit's own stream
        was_training = m.training
        m.eval()
        x_adv = ensemble_attack(m, x_src, y_src, cfg.attack_size, cfg.attack_steps, nh, g)
        m.train(was_training)
        benign, adversarial = m.model_inputs(x, nx), m.model_inputs(x_adv)  # the benign path carries the input noise
        # 2. the auto-encoder (trains W1, b1 and its BatchNorm) on the benign and the adversarial inputs, elementwise
        # |Taylor| with the latent noise, as the authors' two EncLayer costs
        loss_ae = (m.paper_reconstruction_loss(benign, nh) + m.paper_reconstruction_loss(adversarial, nh)) / 2
        # 3. second-order Taylor loss on the noisy latent; W1 and b1 are trained by the auto-encoder only
        w1, b1 = m.encoder.weight.detach(), m.encoder.bias.detach()
        terms = []
        for inputs, labels in ((benign, y), (adversarial, y_src)):
            h1 = F.conv2d(inputs, w1, b1, stride=2, padding=m.kernel // 2) + nh
            terms.append(taylor_sigmoid_ce(m.out(m.head_hidden(h1)), F.one_hot(labels, num_classes).to(x.dtype)))
        loss_cls = (terms[0] + cfg.alpha * terms[1]) / (1 + cfg.alpha)
        return cfg.ae_weight * loss_ae + loss_cls + self.coefficient_noise(nw)

    def coefficient_noise(self, nw: Tensor) -> Tensor:
        """Paper mode's functional mechanism on the output layer: noise added to the batch-mean linear
        coefficients of the weights, K sum_kj nw_kj W_kj with K classes (its gradient is the released noise; the
        bias is not noised, as in the authors' code)."""
        # the authors' MNIST code subtracts sum(noise * W) from each of the L x K Taylor terms before the 1 / L
        # mean, so the released noise is K (the number of classes) times one draw: K Lap(Delta3 / (eps3 L))
        return self.model.out.out_features * (nw * self.model.out.weight).sum()

    # ---------------------------------------------------------------- the loop's step

    def step(self, num_classes: int = 10):
        """The loop's step: the disjoint batches this rank takes (``workers`` of them, or one per rank under
        torchrun), each visit's release (corrected) or loss gradient (paper) averaged, averaged over ranks,
        the optimizer's update, then W1 projected (corrected mode, post-processing)."""

        def disjoint_batches(batch, state):
            rank, world = rank_and_world()
            workers = 1 if world > 1 else self.config.workers
            for w in range(workers):
                index = ((state.step * world + rank) * workers + w) % len(self.batches)
                yield index, 1.0 / workers

        def batch_loss(index: int, state) -> Tensor | tuple[Tensor, Tensor]:
            device = state.data.x_train.device
            idx = self.batches[index].to(device)
            x, y = state.data.x_train[idx], state.data.y_train[idx]
            if self.config.paper_compat:
                other = self.batches[(index + 1) % len(self.batches)].to(device)
                return self.batch_loss(state.net, x, y, index, state.step, num_classes,
                                       state.data.x_train[other], state.data.y_train[other])
            released = self.release(index, state.step, x, y, num_classes)
            params = [p for p in self.model.parameters() if p.requires_grad]
            # a surrogate whose gradient is the released tensor; nothing un-noised is reported
            surrogate = sum((p * r.detach()).sum() for p, r in zip(params, released))
            return surrogate, torch.zeros((), device=device)

        def average_over_ranks(state) -> None:
            world = world_size()
            if world > 1:  # DDP is not used for this step: average the gradients explicitly
                for p in self.model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world

        def project(state) -> None:
            if not self.config.paper_compat:
                project_w1(self.model, self.config.w1_norm)

        return loss_step(batch_loss, parts=disjoint_batches, before_step=average_over_ranks, after_step=project)


class _Method(nn.Module):
    """Calls ``method`` of the wrapped model as ``forward`` (for torch.func.functional_call)."""

    def __init__(self, m: nn.Module, method: str):
        super().__init__()
        self.m, self.method = m, method

    def forward(self, *args: Tensor) -> Tensor:
        return getattr(self.m, self.method)(*args)


def replace_latent_scale(scales: NoiseScales, latent_scale: float) -> NoiseScales:
    """The corrected mode's scales: only the latent noise (certification) is used, at ``latent_scale``.

    Example:
        >>> s = replace_latent_scale(noise_scales(1.0, 1.0, 64, 1.0, 1, 4, 3, 10), 0.3)
        >>> s.latent_scale, s.input_scale, s.output_scale
        (0.3, 0.0, 0.0)
    """
    from dataclasses import replace

    return replace(scales, latent_scale=latent_scale, input_scale=0.0, output_scale=0.0)


@torch.no_grad()
def project_w1(model: StoBatchNet, bound: float) -> None:
    """Scale W1 down so its spectral norm (as reshaped for the bound) is <= ``bound``.

    Example:
        >>> net = StoBatchNet()
        >>> float(spectral_norm_w1(net.encoder.weight)) > 0.05
        True
        >>> project_w1(net, 0.05)
        >>> round(float(spectral_norm_w1(net.encoder.weight)), 6)
        0.05
    """
    norm = float(spectral_norm_w1(model.encoder.weight))
    if norm > bound:
        model.encoder.weight.mul_(bound / norm)


def averaged_gradient(sto: StoBatch, data, step: int, batch_indices: list[int], num_classes: int = 10) -> list[Tensor]:
    """The mean over ``batch_indices`` of each disjoint batch's released gradient (corrected) or loss gradient
    (paper mode): the reference for the distributed run.

    Example:
        The corrected mode's reference is the mean of the batches' releases, each as :meth:`StoBatch.release` gives
        it (its noise drawn from the batch and the step):

        >>> import torch
        >>> from types import SimpleNamespace as Data
        >>> net = StoBatchNet()
        >>> sto = StoBatch(net, n=64, config=StoBatchConfig(batch=16, steps=4, eps2=1.0, eps3=1.0))
        >>> data = Data(x_train=torch.rand(64, *net.input_shape), y_train=torch.randint(0, 10, (64,)))
        >>> release = lambda i: sto.release(i, 0, data.x_train[sto.batches[i]], data.y_train[sto.batches[i]], 10)
        >>> mean = averaged_gradient(sto, data, step=0, batch_indices=[0, 2])
        >>> all(torch.allclose(m, (a + b) / 2, atol=1e-6) for m, a, b in zip(mean, release(0), release(2)))
        True
    """
    grads = None
    params = list(sto.model.parameters())
    for index in batch_indices:
        idx = sto.batches[index]
        x, y = data.x_train[idx], data.y_train[idx]
        if sto.config.paper_compat:
            other = sto.batches[(index + 1) % len(sto.batches)]
            loss = sto.batch_loss(sto.model, x, y, index, step, num_classes, data.x_train[other], data.y_train[other])
            g = torch.autograd.grad(loss, params, allow_unused=True)
            g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        else:
            g = sto.release(index, step, x, y, num_classes)
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return [g / len(batch_indices) for g in grads]


# ---------------------------------------------------------------- certification


def l1_sensitivity(model: StoBatchNet) -> float:
    """How much the latent's l1 norm can change per unit l1 change of the input: the largest, over input
    channels, sum of |W1| over output channels and kernel positions (each input pixel reaches each
    output channel through at most every kernel position).

    Example:
        >>> import torch
        >>> net = StoBatchNet()
        >>> x = torch.rand(1, *net.input_shape)
        >>> d = torch.zeros_like(x); d[0, 0, 3, 3] = 0.01                 # an l1 change of 0.01 at one pixel
        >>> change = float((net.encode(x + d) - net.encode(x)).abs().sum().detach())
        >>> change <= 0.01 * l1_sensitivity(net) + 1e-6
        True
    """
    w = model.encoder.weight.detach().abs()
    return float(w.sum(dim=(0, 2, 3)).max())


@torch.no_grad()
def certify_pixeldp(model: StoBatchNet, x: Tensor, latent_scale: float, n0: int, n: int, alpha: float,
                    num_classes: int, generator: torch.Generator | None = None) -> tuple[int, float]:
    """(class, certified l1 attack size) from fresh Laplace latent noise at ``latent_scale``: n0 draws select
    the class, n fresh draws give Clopper-Pearson bounds on its probability and the runner-up's, and the
    Laplace PixelDP condition gives the size (0 if not robust).

    Example:
        A network that predicts class 3 under any noise wins all n draws, so its bound is the Clopper-Pearson one for
        n of n, alpha^(1/n), and its size is the Laplace PixelDP size at that bound:

        >>> import torch
        >>> from backproplab.methods.robustness import pixeldp_certified_size
        >>> net = StoBatchNet()
        >>> with torch.no_grad():
        ...     _ = net.out.weight.zero_(), net.out.bias.zero_(), net.out.bias.index_fill_(0, torch.tensor(3), 5.0)
        >>> label, size = certify_pixeldp(net, torch.rand(*net.input_shape), latent_scale=1.0, n0=10, n=100, alpha=0.05,
        ...                               num_classes=10, generator=torch.Generator().manual_seed(0))
        >>> bound = 0.05 ** (1 / 100)
        >>> expected = pixeldp_certified_size(bound, 1 - bound, 1.0, l1_sensitivity(net), 0.0, mechanism="laplace")
        >>> label, size > 0, abs(size - expected) < 1e-9
        (3, True, True)

    References:
        Lecuyer et al., IEEE S&P 2019 (PixelDP, Laplace mechanism); Phan et al., ICML 2020 (arXiv:1903.09822).
    """
    from .robustness import lower_confidence_bound, pixeldp_certified_size

    model.eval()

    def counts(k: int) -> Tensor:
        noise = laplace((k, *model.latent_shape), latent_scale, generator, x.device)
        pred = model(x.unsqueeze(0).expand(k, *x.shape), noise).argmax(1)
        return torch.bincount(pred.cpu(), minlength=num_classes)

    top = int(counts(n0).argmax())
    c = counts(n)
    # one bound at level alpha covers every other class at once: each runner-up has p <= 1 - p_top (a bound
    # on the empirical runner-up alone would need a Bonferroni correction over the K - 1 others)
    lo = lower_confidence_bound(int(c[top]), n, alpha)
    hi = 1.0 - lo
    size = pixeldp_certified_size(lo, hi, latent_scale, l1_sensitivity(model), delta=0.0, mechanism="laplace")
    return top, size


@torch.no_grad()
def certify_pixeldp_paper(model: StoBatchNet, x: Tensor, input_scale: float, latent_scale: float,
                          fixed_input_noise: Tensor,
                          fixed_latent_noise: Tensor, n: int, alpha: float, num_classes: int,
                          generator: torch.Generator | None = None) -> tuple[int, float] | list[tuple[int, float]]:
    """The certification as the authors' code runs it (``paper_compat=True``); not a valid certificate.

    ``x`` is meant to be an adversarial example (their evaluation certifies attacked inputs), one input or a
    batch of them. Each of the ``n`` draws multiplies the softmax of two forwards: fresh input noise at a tenth
    of the training scale on top of the *training* input noise draw, and fresh latent noise at a tenth of the
    training scale on top of the *training* latent draw; each draw is shared by the batch's inputs, as the
    authors feed one draw to their whole test batch. The counts lag one draw (the first count is the
    prediction under the training noise alone). The same counts pick the class and bound its
    probability, and the bound is evaluated at the training latent scale, not at the scale sampled.
    Returns (class, l1 size) like :func:`certify_pixeldp`, a list of them for a batch.

    Example:
        A batch gives what each of its inputs gives alone under the same draws (one draw per iteration, shared by the
        batch, as the authors feed their test batch):

        >>> import torch
        >>> net = StoBatchNet()
        >>> x = torch.rand(2, *net.input_shape)
        >>> fixed_in, fixed_latent = torch.zeros(net.input_shape), torch.zeros(net.latent_shape)
        >>> certify = lambda inputs: certify_pixeldp_paper(net, inputs, 0.1, 0.2, fixed_in, fixed_latent, n=50,
        ...                                                alpha=0.05, num_classes=10,
        ...                                                generator=torch.Generator().manual_seed(0))
        >>> batch = certify(x)
        >>> len(batch), batch[0] == certify(x[0]), batch[1] == certify(x[1:])[0]
        (2, True, True)
    """
    from .robustness import lower_confidence_bound, pixeldp_certified_size, upper_confidence_bound

    model.eval()
    batched = x.dim() == len(model.input_shape) + 1
    xb = x if batched else x.unsqueeze(0)
    rows = torch.arange(len(xb))
    latent = fixed_latent_noise.unsqueeze(0).expand(len(xb), *fixed_latent_noise.shape)
    counts = torch.zeros(len(xb), num_classes, dtype=torch.int64)
    pred = model(xb, latent, input_noise=fixed_input_noise).argmax(1).cpu()
    for _ in range(n):
        counts[rows, pred] += 1
        fresh_x = laplace((1, *fixed_input_noise.shape), input_scale / 10, generator, x.device)
        fresh_h = laplace((1, *model.latent_shape), latent_scale / 10, generator, x.device)
        probs = (model(xb, latent, input_noise=fixed_input_noise + fresh_x).softmax(1)
                 * model(xb, latent + fresh_h, input_noise=fixed_input_noise).softmax(1))
        pred = probs.argmax(1).cpu()
    sensitivity = l1_sensitivity(model)
    out = []
    for c in counts:
        top = int(c.argmax())
        second = int(torch.cat([c[:top], c[top + 1:]]).max())
        lo = lower_confidence_bound(int(c[top]), n, alpha / 2)
        hi = upper_confidence_bound(second, n, alpha / 2)
        out.append((top, pixeldp_certified_size(lo, hi, latent_scale, sensitivity, delta=0.0, mechanism="laplace")))
    return out if batched else out[0]


# ---------------------------------------------------------------- membership audit


def audit_epsilon(scores_members: Tensor, scores_outsiders: Tensor, alpha: float = 0.05) -> dict:
    """Empirical lower bound on epsilon from a threshold membership test (Jagielski et al. 2020 style).

    For every threshold t, an epsilon-DP mechanism has TPR(t) <= e^eps FPR(t) (and the same for the
    complements). With one-sided Clopper-Pearson bounds at level alpha / (2 T) (Bonferroni over the T
    thresholds and both directions), eps_lb = max_t ln(TPR_lo / FPR_hi) holds with probability >= 1 - alpha.
    Higher scores mean "member".

    Example:
        >>> import torch
        >>> audit_epsilon(torch.ones(500), torch.zeros(500))["epsilon_lower_bound"] > 4     # perfectly separable
        True
        >>> same = torch.arange(200.0)
        >>> audit_epsilon(same, same)["epsilon_lower_bound"]                               # indistinguishable
        0.0

    References:
        Jagielski, Ullman and Oprea, "Auditing differentially private machine learning: How private is private
        SGD?", NeurIPS 2020.
    """
    from .robustness import lower_confidence_bound, upper_confidence_bound

    members, outsiders = scores_members.flatten().double(), scores_outsiders.flatten().double()
    thresholds = torch.unique(torch.cat([members, outsiders]))
    level = alpha / (2 * max(len(thresholds), 1))
    best, best_t = 0.0, None
    m, o = len(members), len(outsiders)
    for t in thresholds.tolist():
        tests = ((int((members >= t).sum()), m, int((outsiders >= t).sum()), o),  # "member if score >= t"
                 (int((outsiders < t).sum()), o, int((members < t).sum()), m))  # the complementary test
        for tp, n_pos, fp, n_neg in tests:
            tpr_lo = lower_confidence_bound(tp, n_pos, level)
            fpr_hi = upper_confidence_bound(fp, n_neg, level)
            if tpr_lo > 0 and fpr_hi > 0:
                eps = math.log(tpr_lo / fpr_hi)
                if eps > best:
                    best, best_t = eps, t
    return {"epsilon_lower_bound": best, "threshold": best_t, "members": m, "outsiders": o, "alpha": alpha}


def one_run_audit(scores: Tensor, included: Tensor, guesses: int | None = None, beta: float = 0.05) -> dict:
    """Empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

    m canaries each join the training set independently with probability 1/2 (``included``); after training,
    ``scores`` rank them (higher: "looks trained on"). The auditor guesses "in" for the ``guesses // 2``
    highest scores and "out" for as many lowest, abstaining on the rest. For a pure epsilon-DP mechanism the
    number of correct guesses is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)), r = guesses;
    the bound is the largest eps at which the observed count c would still be in that binomial's upper beta
    tail: P[Bin(r, p_eps) >= c] = beta. With probability >= 1 - beta it is below the true epsilon.
    (For an (eps, delta) mechanism the same count bounds eps up to a term of order r delta, negligible for
    delta = 1e-5.) Its power grows with r: r perfect guesses certify at most ln(q / (1 - q)), q = beta^(1/r).

    Example:
        >>> import torch
        >>> included = torch.rand(400, generator=torch.Generator().manual_seed(0)) < 0.5
        >>> out = one_run_audit(included.double(), included, guesses=200)      # a model that memorises every canary
        >>> out["correct"], round(out["epsilon_lower_bound"], 2), round(out["max_certifiable"], 2)
        (200, 4.19, 4.19)
        >>> unrelated = torch.randn(400, generator=torch.Generator().manual_seed(1))   # scores that ignore membership
        >>> one_run_audit(unrelated, included, guesses=200)["epsilon_lower_bound"] < 0.5
        True

    References:
        Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023.
    """
    from scipy import optimize, stats

    scores, included = scores.flatten().double(), included.flatten().bool()
    m = len(scores)
    r = min(guesses if guesses is not None else m, m)
    order = torch.argsort(scores, descending=True)
    k_in = r // 2
    picks_in, picks_out = order[:k_in], order[m - (r - k_in):] if r - k_in else order[:0]
    correct = int(included[picks_in].sum()) + int((~included[picks_out]).sum())

    def tail(eps: float) -> float:  # P[Bin(r, p_eps) >= correct] - beta, increasing in eps
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(stats.binom.sf(correct - 1, r, p)) - beta

    if r == 0 or tail(0.0) >= 0:
        bound = 0.0
    elif tail(50.0) < 0:
        bound = 50.0
    else:
        bound = float(optimize.brentq(tail, 0.0, 50.0))
    return {"epsilon_lower_bound": bound, "correct": correct, "guesses": r, "canaries": m, "beta": beta,
            "max_certifiable": math.log(beta ** (1 / r) / (1 - beta ** (1 / r))) if r else 0.0}

"""StoBatch: scalable differential privacy with certified robustness in adversarial learning.

Phan, Thai, Hu, Jin, Sun, Dou, ICML 2020 (arXiv 1903.09822). Structure follows the authors' TensorFlow
code; behaviour is corrected by default, and ``paper_compat=True`` restores the paper's.

1. First layer: a tied-weight convolutional auto-encoder (encoder conv W1, decoder its transpose). Its
   reconstruction loss is the first-order Taylor expansion of the logistic cross-entropy (functional
   mechanism), R~ = sum_i [ln 2 + (1/2 - x_i) z_i] with z the decoder's pre-activation, computed on inputs
   with Laplace noise; the latent h1 also gets Laplace noise. Sensitivity Delta2 = C (H W + 2) k^2
   (C input channels, H x W latent map, k x k kernels); gamma = 2 Delta2 / (L ||W1||) with ||W1|| the largest
   singular value of W1 reshaped to (k k C_in, C_out); gamma_x = Delta2 / L; eps2' = eps2 / (1 + 1/gamma +
   1/gamma_x); input noise Lap(Delta2 / (L eps2')), latent noise Lap(2 Delta2 / (L eps2')).
2. Adversarial examples (I-FGSM / MIM / PGD, l-inf, a random size in (0, mu_max] each step) are crafted
   against the noisy model and mixed with benign examples.
3. The rest of the network is trained on the second-order Taylor polynomial of the per-logit sigmoid
   cross-entropy, T(z) = ln 2 + (1/2 - y) z + z^2 / 8, with (T_benign + alpha T_adv) / (1 + alpha), alpha = 1.5;
   the label-dependent (linear) coefficients of the output layer, weights and bias, get Laplace noise
   Lap(Delta3 / (eps3 L)) on the batch-mean coefficients, Delta3 = 2 (hk + 1), with the last hidden layer
   (width hk) clipped to [-1, 1] and the bias treated as the weight of a constant input 1.
4. Stochastic batches: the training set is cut once into fixed disjoint batches; each step, ``workers``
   workers (torch.distributed ranks, or a loop in one process) each take one batch and the gradients are
   averaged (parallel composition over disjoint batches).
5. The functional mechanism releases each batch's noisy objective once: the noise of a batch is drawn once,
   shared by its L examples (the 1/L calibration assumes one draw per batch), and reused for the whole run,
   so optimising it again is post-processing. The budget is then eps2 + eps3 (pure epsilon-DP) over the
   disjoint batches. ``redraw_noise=True`` draws fresh noise at every visit of a batch instead; each visit
   is a new release and :meth:`StoBatch.epsilon_spent` composes them (visits x (eps2 + eps3)).
6. Certification: PixelDP-style, from Monte-Carlo class frequencies under fresh latent noise.

Paper mode (``paper_compat=True``) follows the authors' code: one noise draw for the whole run, shared by
every example and batch; the auto-encoder minimises |R~|; W1 is trained by the auto-encoder only; the benign
classifier path also carries the input noise; adversarial examples from their ensemble (the batch in thirds
attacked by I-FGSM, MIM and PGD at one random size per step, :func:`ensemble_attack`); BatchNorm; the
measured ||W1|| at initialisation; their certification procedure. (One difference remains: their
adversarial thirds come from other batches than the benign one; here they are the same batch's examples.)

Corrected by default (``paper_compat=False``):
  * one noise draw per disjoint batch (the paper's code draws a single tensor for all batches, so two
    batches share their noise and subtracting their gradients cancels it: no guarantee is left);
  * the sensitivity bound holds throughout training: after every step W1 is projected back to spectral norm
    <= ``w1_norm`` (the paper measures ||W1|| once at initialisation);
  * GroupNorm instead of BatchNorm on private batches (BatchNorm mixes examples and leaks through its
    running statistics);
  * certification with fresh noise at exactly the training scale, separate selection and estimation
    samples, on clean inputs, reported as a curve over attack size (paper mode:
    :func:`certify_pixeldp_paper`, which certifies attacked inputs with the reused training noise plus
    fresh noise at a tenth of the scale, and selects and bounds the class from the same draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..train import loss_step

LN2 = math.log(2.0)


# ---------------------------------------------------------------- Taylor losses


def taylor_reconstruction(z: Tensor, x: Tensor) -> Tensor:
    """First-order Taylor expansion around z = 0 of the logistic cross-entropy of reconstructing x in [0, 1]
    from pre-activations z: per element ln 2 + (1/2 - x) z, summed over elements, averaged over the batch."""
    return (LN2 + (0.5 - x) * z).flatten(1).sum(1).mean()


def exact_reconstruction(z: Tensor, x: Tensor) -> Tensor:
    """The exact logistic cross-entropy x softplus(-z) + (1 - x) softplus(z), same reduction."""
    return (x * F.softplus(-z) + (1 - x) * F.softplus(z)).flatten(1).sum(1).mean()


def taylor_sigmoid_ce(z: Tensor, y_onehot: Tensor) -> Tensor:
    """Second-order Taylor expansion around z = 0 of the per-logit sigmoid cross-entropy:
    ln 2 + (1/2 - y) z + z^2 / 8, summed over logits, averaged over the batch."""
    return (LN2 + (0.5 - y_onehot) * z + z.pow(2) / 8).sum(1).mean()


def exact_sigmoid_ce(z: Tensor, y_onehot: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(z, y_onehot, reduction="none").sum(1).mean()


# ---------------------------------------------------------------- noise scales


def spectral_norm_w1(weight: Tensor) -> Tensor:
    """Largest singular value of the first-layer kernel reshaped to (k k C_in, C_out)."""
    c_out = weight.shape[0]
    if not torch.isfinite(weight).all():
        raise FloatingPointError("the first-layer kernel W1 has non-finite entries: training diverged; lower the "
                                 "learning rate or raise the privacy budget (the noise scales grow as 1/epsilon)")
    return torch.linalg.matrix_norm(weight.detach().permute(2, 3, 1, 0).reshape(-1, c_out), ord=2)


@dataclass(frozen=True)
class NoiseScales:
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
    """The StoBatch formulas (see the module docstring) for batch size L = ``batch``."""
    delta2 = in_channels * (latent_hw + 2) * kernel**2
    gamma = 2 * delta2 / (batch * w1_norm)
    gamma_x = delta2 / batch
    eps2p = eps2 / (1 + 1 / gamma + 1 / gamma_x)
    delta3 = 2 * (hidden + 1)  # the bias is the weight of a constant input 1
    return NoiseScales(delta2, gamma, gamma_x, eps2p, delta2 / (batch * eps2p), 2 * delta2 / (batch * eps2p),
                       delta3, delta3 / (eps3 * batch))


def laplace(shape, scale: float, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Laplace(0, scale) samples by inverse CDF, in float64 with u kept off the endpoint: a float32
    uniform hits exactly 0 about once in 2^24 draws, which would give an infinite sample."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(2.0**-53) - 0.5
    return (-scale * u.sign() * torch.log1p(-2 * u.abs())).to(device=device, dtype=torch.get_default_dtype())


# ---------------------------------------------------------------- the network


class StoBatchNet(nn.Module):
    """Tied-weight conv auto-encoder first layer (k x k, stride 2) + conv block + hidden layer (clipped to
    [-1, 1]) + output layer. ``norm`` is "group" (corrected) or "batch" (paper)."""

    def __init__(self, input_shape=(1, 8, 8), num_classes: int = 10, latent: int = 16, width: int = 32,
                 hidden: int = 64, kernel: int = 3, norm: str = "group"):
        super().__init__()
        c, h, w = input_shape
        self.kernel, self.in_channels = kernel, c
        self.encoder = nn.Conv2d(c, latent, kernel, stride=2, padding=kernel // 2, bias=False)
        with torch.no_grad():
            self.latent_shape = self.encoder(torch.zeros(1, c, h, w)).shape[1:]
        self.conv = nn.Conv2d(latent, width, 3, padding=1)
        self.norm = nn.GroupNorm(4, width) if norm == "group" else nn.BatchNorm2d(width)
        self.hidden = nn.Linear(width * self.latent_shape[1] * self.latent_shape[2], hidden)
        self.out = nn.Linear(hidden, num_classes)
        self.input_shape = tuple(input_shape)

    @property
    def latent_hw(self) -> int:
        return int(self.latent_shape[1] * self.latent_shape[2])

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode_preactivation(self, h: Tensor) -> Tensor:
        """The tied decoder's pre-activation: conv_transpose with the encoder's weights."""
        out = F.conv_transpose2d(h, self.encoder.weight, stride=2, padding=self.kernel // 2,
                                 output_padding=self.input_shape[1] - ((h.shape[2] - 1) * 2 - 2 * (self.kernel // 2)
                                                                       + self.kernel))
        return out

    def head_hidden(self, h1: Tensor) -> Tensor:
        h = F.relu(self.norm(self.conv(F.relu(h1))))
        return torch.clamp(self.hidden(h.flatten(1)), -1.0, 1.0)  # clipped last hidden layer (Delta3 = 2 hk)

    def forward(self, x: Tensor, latent_noise: Tensor | None = None) -> Tensor:
        h1 = self.encode(x)
        if latent_noise is not None:
            h1 = h1 + latent_noise
        return self.out(self.head_hidden(h1))


# ---------------------------------------------------------------- batches and the training step


def disjoint_batches(n: int, batch: int, seed: int = 0) -> list[Tensor]:
    """The training set cut once into fixed disjoint batches (a seeded permutation); the last may be smaller."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[s:s + batch] for s in range(0, n, batch)]


def ifgsm_random_size(model: StoBatchNet, x: Tensor, y: Tensor, max_size: float, steps: int, latent_noise: Tensor,
                      generator: torch.Generator | None = None) -> Tensor:
    """I-FGSM (l-inf) against the noisy model, with an attack size drawn uniformly in (0, max_size]."""
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
    against the noisy model, pixels kept in [0, 1]."""
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
    eps2: float = 0.5
    eps3: float = 0.5
    batch: int = 128  # L
    workers: int = 2  # disjoint batches averaged per step (torch.distributed ranks, or a loop)
    alpha: float = 1.5  # weight of the adversarial Taylor term
    attack_size: float = 0.2  # mu_max of the training attacks (l-inf, inputs in [0, 1])
    attack_steps: int = 3
    w1_norm: float = 1.0  # the bound on ||W1|| used in the noise scales (enforced unless paper_compat)
    ae_weight: float = 1.0  # weight of the auto-encoder's Taylor loss in the total (the paper adds them)
    paper_compat: bool = False
    redraw_noise: bool = False  # fresh noise at every visit of a batch: each visit composes (epsilon_spent)
    seed: int = 0


class StoBatch:
    """The StoBatch training step for the loop (with ``optimizer="sgd"``/``"adam"`` on the model).

    Under torch.distributed, rank r takes disjoint batch (step * world + r) mod B and DDP averages the
    gradients; in one process the ``workers`` batches are looped over and their gradients averaged.
    """

    def __init__(self, model: StoBatchNet, n: int, config: StoBatchConfig):
        self.model, self.config = model, config
        self.batches = disjoint_batches(n, config.batch, config.seed)
        w1 = config.w1_norm if not config.paper_compat else float(spectral_norm_w1(model.encoder.weight))
        self.scales = noise_scales(config.eps2, config.eps3, config.batch, w1, model.in_channels, model.latent_hw,
                                   model.kernel, model.hidden.out_features)
        self._fixed_noise: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        if not config.paper_compat:
            project_w1(model, config.w1_norm)

    def epsilon_claimed(self) -> float:
        """The StoBatch analysis' budget for one release per disjoint batch: eps2 + eps3."""
        return self.config.eps2 + self.config.eps3

    def visits(self, steps: int, world: int = 1) -> list[int]:
        """How often each disjoint batch was used in ``steps`` steps (``world`` ranks, or ``workers`` batches)."""
        per_step = world if world > 1 else self.config.workers
        counts = [0] * len(self.batches)
        for i in range(steps * per_step):
            counts[i % len(self.batches)] += 1
        return counts

    def epsilon_spent(self, steps: int, world: int = 1) -> float:
        """The epsilon of what the code released in ``steps`` steps: eps2 + eps3 when each batch's noise is drawn
        once; times the most visits of one batch when it is re-drawn every visit (sequential composition);
        infinite in paper mode with several batches, whose shared draw cancels between batches."""
        if self.config.paper_compat and len(self.batches) > 1:
            return math.inf
        draws = max(self.visits(steps, world)) if self.config.redraw_noise else 1
        return draws * self.epsilon_claimed()

    def noise(self, batch_index: int, step: int, shape_x, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(input noise, latent noise, output-weight noise, output-bias noise) of a batch: one draw shared by its
        examples, drawn once per disjoint batch (``redraw_noise``: at every step; paper mode: one draw for all
        batches)."""
        key = (0 if self.config.paper_compat else batch_index, step if self.config.redraw_noise else -1)
        if key in self._fixed_noise:
            return self._fixed_noise[key]
        g = torch.Generator().manual_seed(hash((self.config.seed, *key)) % 2**63)
        s, m = self.scales, self.model
        noise = (laplace((1, *shape_x[1:]), s.input_scale, g, device),
                 laplace((1, *m.latent_shape), s.latent_scale, g, device),
                 laplace(m.out.weight.shape, s.output_scale, g, device),
                 laplace(m.out.bias.shape, s.output_scale, g, device))
        if not self.config.redraw_noise:
            self._fixed_noise[key] = noise
        return noise

    def batch_loss(self, net: nn.Module, x: Tensor, y: Tensor, batch_index: int, step: int,
                   num_classes: int) -> Tensor:
        m, cfg = self.model, self.config
        nx, nh, nw, nb = self.noise(batch_index, step, x.shape, x.device)
        # 1. auto-encoder on noisy inputs: first-order Taylor reconstruction loss (trains W1)
        z = m.decode_preactivation(m.encode(x + nx))
        loss_ae = taylor_reconstruction(z, x + nx)
        if cfg.paper_compat:  # the authors' code minimises |R~| (R~ alone is unbounded below)
            loss_ae = loss_ae.abs()
        # 2. adversarial examples against the noisy model
        g = torch.Generator().manual_seed(hash((cfg.seed, step, batch_index, 1)) % 2**63)
        if cfg.paper_compat:
            x_adv = ensemble_attack(m, x, y, cfg.attack_size, cfg.attack_steps, nh, g)
        else:
            x_adv = ifgsm_random_size(m, x, y, cfg.attack_size, cfg.attack_steps, nh, g)
        # 3. second-order Taylor loss on the noisy latent, noisy linear coefficients (trains all layers; in
        # paper mode W1 is trained by the auto-encoder only and the benign path also sees the input noise)
        onehot = F.one_hot(y, num_classes).to(x.dtype)
        terms = []
        for inputs in ((x + nx) if cfg.paper_compat else x, x_adv):
            h1 = (F.conv2d(inputs, m.encoder.weight.detach(), stride=2, padding=m.kernel // 2) if cfg.paper_compat
                  else m.encode(inputs)) + nh
            terms.append(taylor_sigmoid_ce(m.out(m.head_hidden(h1)), onehot))
        loss_cls = (terms[0] + cfg.alpha * terms[1]) / (1 + cfg.alpha)
        return cfg.ae_weight * loss_ae + loss_cls + self.coefficient_noise(nw, nb)

    def coefficient_noise(self, nw: Tensor, nb: Tensor) -> Tensor:
        """The functional mechanism on the output layer: noise added to the batch-mean linear coefficients of
        the weights and the bias, sum_kj nw_kj W_kj + sum_k nb_k b_k (its gradient is the released noise)."""
        return (nw * self.model.out.weight).sum() + (nb * self.model.out.bias).sum()

    def step(self, num_classes: int = 10):
        """The loop's step: the disjoint batches this rank takes (``workers`` of them, or one per rank under
        torchrun), each batch's noisy Taylor loss averaged, the gradients averaged over ranks, Adam's
        update, then W1 projected (corrected mode)."""

        def world_rank() -> tuple[int, int]:
            return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)

        def disjoint_batches(batch, state):
            world, rank = world_rank()
            workers = 1 if world > 1 else self.config.workers
            for w in range(workers):
                index = ((state.step * world + rank) * workers + w) % len(self.batches)
                yield (index, self.batches[index].to(state.data.x_train.device)), 1.0 / workers

        def batch_loss(part, state) -> Tensor:
            index, idx = part
            return self.batch_loss(state.net, state.data.x_train[idx], state.data.y_train[idx], index, state.step,
                                   num_classes)

        def average_over_ranks(state) -> None:
            world, _ = world_rank()
            if world > 1:  # DDP is not used for this step: average the gradients explicitly
                for p in self.model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world

        def project(state) -> None:
            if not self.config.paper_compat:
                project_w1(self.model, self.config.w1_norm)

        return loss_step(batch_loss, parts=disjoint_batches, before_step=average_over_ranks, after_step=project)


@torch.no_grad()
def project_w1(model: StoBatchNet, bound: float) -> None:
    """Scale W1 down so its spectral norm (as reshaped for the bound) is <= ``bound``."""
    norm = float(spectral_norm_w1(model.encoder.weight))
    if norm > bound:
        model.encoder.weight.mul_(bound / norm)


def averaged_gradient(sto: StoBatch, data, step: int, batch_indices: list[int], num_classes: int = 10) -> list[Tensor]:
    """The mean over ``batch_indices`` of each disjoint batch's gradient (the reference for the
    distributed run)."""
    grads = None
    for index in batch_indices:
        idx = sto.batches[index]
        loss = sto.batch_loss(sto.model, data.x_train[idx], data.y_train[idx], index, step, num_classes)
        g = torch.autograd.grad(loss, list(sto.model.parameters()), allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, sto.model.parameters())]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return [g / len(batch_indices) for g in grads]


# ---------------------------------------------------------------- certification


def l1_sensitivity(model: StoBatchNet) -> float:
    """How much the latent's l1 norm can change per unit l1 change of the input: the largest, over input
    channels, sum of |W1| over output channels and kernel positions (each input pixel reaches each
    output channel through at most every kernel position)."""
    w = model.encoder.weight.detach().abs()
    return float(w.sum(dim=(0, 2, 3)).max())


@torch.no_grad()
def certify_pixeldp(model: StoBatchNet, x: Tensor, latent_scale: float, n0: int, n: int, alpha: float,
                    num_classes: int, generator: torch.Generator | None = None) -> tuple[int, float]:
    """(class, certified l1 attack size) from fresh Laplace latent noise at ``latent_scale``: n0 draws select
    the class, n fresh draws give Clopper-Pearson bounds on its probability and the runner-up's, and the
    Laplace PixelDP condition gives the size (0 if not robust)."""
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
                          generator: torch.Generator | None = None) -> tuple[int, float]:
    """The certification as the authors' code runs it (``paper_compat=True``); not a valid certificate.

    ``x`` is meant to be an adversarial example (their evaluation certifies attacked inputs). Each of the
    ``n`` draws multiplies the softmax of two forwards: fresh input noise at a tenth of the training
    scale on top of the *training* input noise draw, and fresh latent noise at a tenth of the training
    scale on top of the *training* latent draw. The counts lag one draw (the first count is the
    prediction under the training noise alone). The same counts pick the class and bound its
    probability, and the bound is evaluated at the training latent scale, not at the scale sampled.
    Returns (class, l1 size) like :func:`certify_pixeldp`.
    """
    from .robustness import lower_confidence_bound, pixeldp_certified_size, upper_confidence_bound

    model.eval()
    xb = (x + fixed_input_noise).unsqueeze(0)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    pred = int(model(xb, fixed_latent_noise.unsqueeze(0)).argmax(1))
    for _ in range(n):
        counts[pred] += 1
        fresh_x = laplace(xb.shape, input_scale / 10, generator, x.device)
        fresh_h = laplace((1, *model.latent_shape), latent_scale / 10, generator, x.device)
        probs = (model(xb + fresh_x, fixed_latent_noise.unsqueeze(0)).softmax(1)
                 * model(xb, fixed_latent_noise.unsqueeze(0) + fresh_h).softmax(1))
        pred = int(probs.argmax(1))
    top = int(counts.argmax())
    second = int(torch.cat([counts[:top], counts[top + 1:]]).max())
    lo = lower_confidence_bound(int(counts[top]), n, alpha / 2)
    hi = upper_confidence_bound(second, n, alpha / 2)
    size = pixeldp_certified_size(lo, hi, latent_scale, l1_sensitivity(model), delta=0.0, mechanism="laplace")
    return top, size


# ---------------------------------------------------------------- membership audit


def audit_epsilon(scores_members: Tensor, scores_outsiders: Tensor, alpha: float = 0.05) -> dict:
    """Empirical lower bound on epsilon from a threshold membership test (Jagielski et al. 2020 style).

    For every threshold t, an epsilon-DP mechanism has TPR(t) <= e^eps FPR(t) (and the same for the
    complements). With one-sided Clopper-Pearson bounds at level alpha / (2 T) (Bonferroni over the T
    thresholds and both directions), eps_lb = max_t ln(TPR_lo / FPR_hi) holds with probability >= 1 - alpha.
    Higher scores mean "member".
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

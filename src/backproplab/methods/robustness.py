"""Adversarial examples, adversarial training, and certified robustness.

Attacks (on any model mapping inputs to logits; inputs are not clipped to a box since our inputs are
standardised — pass ``clip=(lo, hi)`` to clip):
  :func:`fgsm`  Goodfellow et al. 2015: x + eps sign(grad).
  :func:`pgd`   Madry et al. 2018 (I-FGSM, Kurakin et al. 2017, without ``random_start``): ``steps`` steps of
                size ``step_size`` projected onto the l-inf or l2 ball of radius eps, optional random start.
  :func:`mim`   Dong et al. 2018, momentum iterative method: g <- mu g + grad / |grad|_1, step eps_i sign(g).
Adversarial training (Goodfellow et al. 2015's mixture): loss = (L(x) + alpha L(x_adv)) / (1 + alpha).

Certification:
  Randomized smoothing (Cohen, Rosenfeld, Kolter 2019): g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c).
  :func:`smoothed_predict` is their PREDICT (two-sided binomial test, abstains unless significant at alpha);
  :func:`certify` is CERTIFY: n0 samples select the class, n fresh samples estimate its probability, the
  one-sided Clopper-Pearson lower bound pA at level alpha gives the l2 radius sigma * Phi^-1(pA) (abstain
  if pA <= 1/2). With n samples, pA <= alpha^(1/n), so the radius never exceeds sigma Phi^-1(alpha^(1/n)).
  PixelDP (Lecuyer et al., S&P 2019), used by StoBatch: with noise after the first layer calibrated so that
  the network is (eps, delta)-DP with respect to input changes of size L, a prediction is robust at L if
  E_lb[top] > e^(2 eps) E_ub[second] + (1 + e^eps) delta (:func:`pixeldp_robust`).
"""

from __future__ import annotations

from contextlib import contextmanager

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        (g,) = torch.autograd.grad(loss, x)
    return g


def _hooks_off(model: nn.Module):
    """Opacus's GradSampleModule must not record per-example gradients while attacks run."""
    class _Ctx:
        def __enter__(self):
            self.on = getattr(model, "hooks_enabled", False)
            if self.on:
                model.disable_hooks()

        def __exit__(self, *exc):
            if self.on:
                model.enable_hooks()
    return _Ctx()


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))


def project(delta: Tensor, eps: float, norm_kind: str) -> Tensor:
    """The projection of a perturbation onto the ``norm_kind`` ("linf" or "l2") ball of radius ``eps``, per example.

    Example:
        >>> import torch
        >>> d = torch.tensor([[3.0, 4.0], [0.3, -0.1]])
        >>> torch.allclose(project(d, 1.0, "l2"), torch.tensor([[0.6, 0.8], [0.3, -0.1]]))      # inside: unchanged
        True
        >>> torch.allclose(project(d, 0.2, "linf")[1], torch.tensor([0.2, -0.1]))
        True
    """
    if norm_kind == "linf":
        return delta.clamp(-eps, eps)
    if norm_kind == "l2":
        n = _flat_norm(delta)
        return delta * torch.clamp(eps / n, max=1.0)
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm_kind!r}")


def _ascent(g: Tensor, norm_kind: str) -> Tensor:
    return g.sign() if norm_kind == "linf" else g / _flat_norm(g)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, loss_fn: LossFn = F.cross_entropy,
         clip: tuple[float, float] | None = None) -> Tensor:
    """One signed-gradient step of size eps (l-inf).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model, x, y = nn.Linear(4, 3), torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> torch.allclose((fgsm(model, x, y, eps=0.05) - x).abs(), torch.full((8, 4), 0.05))
        True

    References:
        Goodfellow, Shlens and Szegedy, "Explaining and harnessing adversarial examples", ICLR 2015.
    """
    with _hooks_off(model):
        adv = x + eps * _input_grad(model, x, y, loss_fn).sign()
    return adv.clamp(*clip).detach() if clip else adv.detach()


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 10, step_size: float | None = None,
        norm: str = "linf", random_start: bool = True, loss_fn: LossFn = F.cross_entropy,
        clip: tuple[float, float] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient ascent on the loss inside the ``norm`` ball of radius eps around x.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> adv = pgd(model, x, y, eps=0.1, steps=5)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-6)          # inside the l-inf ball
        True

    References:
        Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards deep learning models resistant to adversarial
        attacks", ICLR 2018.
    """
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    delta = torch.zeros_like(x)
    if random_start:
        if norm == "linf":
            delta = (torch.rand(x.shape, generator=generator, device="cpu").to(x) * 2 - 1) * eps
        else:
            d = torch.randn(x.shape, generator=generator, device="cpu").to(x)
            r = torch.rand(len(x), generator=generator, device="cpu").to(x).view(-1, *[1] * (x.dim() - 1))
            delta = d / _flat_norm(d) * eps * r
        if clip:  # the start must be a valid input too
            delta = (x + delta).clamp(*clip) - x
    with _hooks_off(model):
        for _ in range(steps):
            g = _input_grad(model, x + delta, y, loss_fn)
            delta = project(delta + step_size * _ascent(g, norm), eps, norm)
            if clip:
                delta = (x + delta).clamp(*clip) - x
    return (x + delta).detach()


def mim(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 10, decay: float = 1.0,
        loss_fn: LossFn = F.cross_entropy, clip: tuple[float, float] | None = None) -> Tensor:
    """Momentum iterative method (l-inf): accumulate L1-normalised gradients, step eps/steps along the sign.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model, x, y = nn.Linear(4, 3), torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> bool(((mim(model, x, y, eps=0.1, steps=4) - x).abs() <= 0.1 + 1e-6).all())
        True

    References:
        Dong, Liao, Pang, Su, Zhu, Hu and Li, "Boosting adversarial attacks with momentum", CVPR 2018.
    """
    alpha = eps / steps
    g_acc = torch.zeros_like(x)
    adv = x.clone()
    with _hooks_off(model):
        for _ in range(steps):
            g = _input_grad(model, adv, y, loss_fn)
            g_acc = decay * g_acc + g / g.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            adv = x + project(adv + alpha * g_acc.sign() - x, eps, "linf")
            if clip:
                adv = adv.clamp(*clip)
    return adv.detach()


ATTACKS = {"fgsm": fgsm, "pgd": pgd, "mim": mim}


def adversarial_loss(attack: Callable[..., Tensor], alpha: float = 1.0, **attack_kwargs) -> Callable:
    """``loss_terms(model, x, y)`` = (L(x) + alpha L(attack(x))) / (1 + alpha), each a batch mean.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model, x, y = nn.Linear(4, 3), torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> clean = adversarial_loss(fgsm, alpha=0.0, eps=0.1)(model, x, y)       # alpha 0: the clean loss
        >>> torch.allclose(clean, nn.functional.cross_entropy(model(x), y))
        True
        >>> bool(adversarial_loss(fgsm, alpha=1.0, eps=0.1)(model, x, y) > clean)   # FGSM raises a linear model's loss
        True

    References:
        Goodfellow, Shlens and Szegedy, ICLR 2015, Eq. 6 (the adversarial objective).
    """

    def loss_terms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        was = model.training
        model.eval()
        x_adv = attack(model, x, y, **attack_kwargs)
        model.train(was)
        return (F.cross_entropy(model(x), y) + alpha * F.cross_entropy(model(x_adv), y)) / (1 + alpha)

    return loss_terms


def gaussian_augmentation(sigma: float) -> Callable:
    """``loss_terms`` training on x + N(0, sigma^2 I) (Cohen et al.'s noise augmentation).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model, x, y = nn.Linear(3, 2), torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
        >>> loss_terms = gaussian_augmentation(0.5)
        >>> _ = torch.manual_seed(0); a = loss_terms(model, x, y)
        >>> _ = torch.manual_seed(0); noise = 0.5 * torch.randn_like(x)
        >>> torch.allclose(a, torch.nn.functional.cross_entropy(model(x + noise), y))
        True

    References:
        Cohen, Rosenfeld and Kolter, "Certified adversarial robustness via randomized smoothing", ICML 2019.
    """

    def loss_terms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x + sigma * torch.randn_like(x)), y)

    return loss_terms


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: str, eps: float, batch: int = 512,
                    **kwargs) -> float:
    """Accuracy of ``model`` on ``attack`` ("pgd", "fgsm" or "mim") examples of size ``eps`` around ``x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model, x = nn.Linear(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
        >>> robust_accuracy(model, x, torch.tensor([0, 1]), "pgd", eps=0.2), robust_accuracy(
        ...     model, x, torch.tensor([0, 1]), "pgd", eps=0.6)                   # the margin is 1: l-inf 0.5 flips it
        (1.0, 0.0)
    """
    model.eval()
    correct = 0
    for s in range(0, len(x), batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        adv = ATTACKS[attack](model, xb, yb, eps, **kwargs) if eps > 0 else xb
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == yb).sum())
    return correct / len(x)


# ---------------------------------------------------------------- randomized smoothing


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the block; the caller's mode (train or eval) is restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_counts(model: nn.Module, x: Tensor, sigma: float, n: int, num_classes: int, batch: int = 1000,
                  generator: torch.Generator | None = None) -> Tensor:
    """Class counts of f(x + N(0, sigma^2 I)) over n draws, for a single input x (no batch dim).
    The model runs in eval mode; its own mode is restored afterwards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> first = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = first.weight.zero_(), first.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        >>> sample_counts(first, torch.zeros(2), sigma=0.5, n=50, num_classes=3).tolist()
        [50, 0, 0]
    """
    counts = torch.zeros(num_classes, dtype=torch.long)
    left = n
    with _eval_mode(model):
        while left > 0:
            k = min(batch, left)
            noise = torch.randn((k, *x.shape), generator=generator, device="cpu").to(x) * sigma
            pred = model(x.unsqueeze(0) + noise).argmax(1)
            counts += torch.bincount(pred.cpu(), minlength=num_classes)
            left -= k
    return counts


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials.

    Example:
        >>> round(lower_confidence_bound(100, 100, 0.001), 4)      # alpha^(1/n) when every trial succeeds
        0.9333
    """
    from scipy.stats import beta  # imported on use: scipy.stats costs over a second at import

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p from k successes in n trials.

    Example:
        >>> round(upper_confidence_bound(0, 100, 0.001), 4), upper_confidence_bound(100, 100, 0.001)
        (0.0667, 1.0)
    """
    from scipy.stats import beta

    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


ABSTAIN = -1


def check_smoothing(sigma: float, alpha: float, num_classes: int, **sample_sizes: int) -> None:
    """Refuse settings under which randomized smoothing's answer means nothing (a negative or NaN radius, a
    class chosen from no sample): ValueError naming the argument and its range.

    Example:
        >>> check_smoothing(0.25, 0.001, 10, n0=100, n=1000)
        >>> check_smoothing(0.0, 0.001, 10, n0=100, n=1000)
        Traceback (most recent call last):
        ...
        ValueError: sigma=0.0: the smoothing noise must be a finite number > 0
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma={sigma!r}: the smoothing noise must be a finite number > 0")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r}: the failure probability must lie in (0, 1)")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 2")
    for name, value in sample_sizes.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r}: the number of noise samples must be an integer >= 1")


def smoothed_predict(model: nn.Module, x: Tensor, sigma: float, n: int, alpha: float, num_classes: int,
                     batch: int = 1000, generator: torch.Generator | None = None, *,
                     batched: bool = False) -> int | list[int]:
    """Cohen et al.'s PREDICT: the top class if a two-sided binomial test of top vs runner-up counts
    rejects p = 1/2 at level alpha, else ABSTAIN (P[returning a wrong class] <= alpha).

    ``batched=True``: ``x`` is a batch (first dimension) and a list with one answer per input comes back,
    the inputs taken in order from one noise stream. The model's train/eval mode is left as it was.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> first = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = first.weight.zero_(), first.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        >>> smoothed_predict(first, torch.zeros(2), sigma=0.5, n=50, alpha=0.001, num_classes=3)
        0

    References:
        Cohen, Rosenfeld and Kolter, ICML 2019, Algorithm PREDICT.
    """
    check_smoothing(sigma, alpha, num_classes, n=n)
    if batched:
        return [smoothed_predict(model, xi, sigma, n, alpha, num_classes, batch, generator) for xi in x]
    counts = sample_counts(model, x, sigma, n, num_classes, batch, generator)
    top2 = counts.topk(2)
    na, nb = int(top2.values[0]), int(top2.values[1])
    from scipy.stats import binomtest

    if binomtest(na, na + nb, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])


def certify(model: nn.Module, x: Tensor, sigma: float, n0: int, n: int, alpha: float, num_classes: int,
            batch: int = 1000, generator: torch.Generator | None = None, *,
            batched: bool = False) -> tuple[int, float] | list[tuple[int, float]]:
    """Cohen et al.'s CERTIFY: (class, l2 radius) or (ABSTAIN, 0). Separate selection and estimation samples.

    ``batched=True``: ``x`` is a batch and a list of (class, radius), one per input, comes back (the
    inputs in order, from one noise stream). The model's train/eval mode is left as it was.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> constant = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = constant.weight.zero_(), constant.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
        >>> label, radius = certify(constant, torch.zeros(2), sigma=0.5, n0=10, n=100, alpha=0.001, num_classes=3,
        ...                         generator=torch.Generator().manual_seed(0))
        >>> label, round(radius, 3)        # every sample votes 0: sigma Phi^-1(alpha^(1/n)) = 0.5 Phi^-1(0.9333)
        (0, 0.75)

    References:
        Cohen, Rosenfeld and Kolter, "Certified adversarial robustness via randomized smoothing", ICML 2019.
    """
    check_smoothing(sigma, alpha, num_classes, n0=n0, n=n)
    if batched:
        return [certify(model, xi, sigma, n0, n, alpha, num_classes, batch, generator) for xi in x]
    c = int(sample_counts(model, x, sigma, n0, num_classes, batch, generator).argmax())
    counts = sample_counts(model, x, sigma, n, num_classes, batch, generator)
    pa = lower_confidence_bound(int(counts[c]), n, alpha)
    if pa <= 0.5:
        return ABSTAIN, 0.0
    from scipy.stats import norm

    return c, sigma * float(norm.ppf(pa))


predict = smoothed_predict  # the name Cohen et al. use


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n samples: sigma Phi^-1(alpha^(1/n)).

    Example:
        >>> round(max_certifiable_radius(0.5, 100, 0.001), 3)   # an input every sample votes for gets no more
        0.75
    """
    from scipy.stats import norm

    return sigma * float(norm.ppf(alpha ** (1.0 / n)))


def certified_accuracy(results: list[tuple[int, float]], labels: Tensor, radii: list[float]) -> list[float]:
    """Fraction of examples certified correct with radius >= r, for each r.

    Example:
        >>> import torch
        >>> certified_accuracy([(0, 0.5), (1, 0.2), (2, 0.9)], torch.tensor([0, 1, 1]), [0.0, 0.3])
        [0.6666666666666666, 0.3333333333333333]
    """
    labels = labels.tolist()
    return [sum(1 for (c, rad), y in zip(results, labels) if c == y and rad >= r) / len(labels) for r in radii]


# ---------------------------------------------------------------- PixelDP


def pixeldp_epsilon(size: float, sigma: float, sensitivity: float, delta: float, mechanism: str = "gaussian") -> float:
    """The epsilon that noise of scale ``sigma`` after a layer of l-sensitivity ``sensitivity`` gives for
    input changes of size ``size``: Gaussian sigma = sqrt(2 ln(1.25/delta)) Delta L / eps; Laplace b = Delta L / eps.

    Example:
        >>> import math
        >>> sigma = math.sqrt(2 * math.log(1.25 / 1e-5)) * 1.0 / 2.0    # the Gaussian mechanism for eps = 2
        >>> round(pixeldp_epsilon(size=1.0, sigma=sigma, sensitivity=1.0, delta=1e-5), 6)
        2.0

    References:
        Lecuyer, Atlidakis, Geambasu, Hsu and Jana, "Certified robustness to adversarial examples with
        differential privacy", IEEE S&P 2019 (PixelDP).
    """
    if mechanism == "gaussian":
        return math.sqrt(2 * math.log(1.25 / delta)) * sensitivity * size / sigma
    if mechanism == "laplace":
        return sensitivity * size / sigma
    raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")


def pixeldp_robust(e_lower_top: float, e_upper_second: float, eps: float, delta: float) -> bool:
    """Lecuyer et al.'s robustness condition: E_lb(top) > e^{2 eps} E_ub(second) + (1 + e^eps) delta.

    Example:
        >>> pixeldp_robust(0.9, 0.05, eps=0.5, delta=1e-5)       # 0.9 > e^1 * 0.05 + (1 + e^0.5) 1e-5
        True
        >>> pixeldp_robust(0.5, 0.3, eps=0.5, delta=1e-5)        # 0.5 < e^1 * 0.3
        False

    References:
        Lecuyer, Atlidakis, Geambasu, Hsu and Jana, "Certified robustness to adversarial examples with
        differential privacy", IEEE S&P 2019 (Proposition 1).
    """
    if eps > 300:  # e^{2 eps} overflows: only a zero right-hand side can still be beaten
        return e_upper_second == 0 and delta == 0 and e_lower_top > 0
    return e_lower_top > math.exp(2 * eps) * e_upper_second + (1 + math.exp(eps)) * delta


def pixeldp_certified_size(e_lower_top: float, e_upper_second: float, sigma: float, sensitivity: float,
                           delta: float, mechanism: str = "gaussian", max_size: float = 10.0) -> float:
    """The largest attack size L at which :func:`pixeldp_robust` holds (0 if none), by bisection
    (the condition is monotone in L). The Gaussian mechanism's bound is only valid for eps <= 1.

    Example:
        >>> size = pixeldp_certified_size(0.9, 0.05, sigma=1.0, sensitivity=1.0, delta=1e-5)
        >>> eps = lambda s: pixeldp_epsilon(s, 1.0, 1.0, 1e-5, "gaussian")
        >>> holds = lambda s: eps(s) <= 1 and pixeldp_robust(0.9, 0.05, eps(s), 1e-5)   # the Gaussian bound: eps <= 1
        >>> size > 0, holds(size), holds(1.01 * size)                   # the largest size at which it holds
        (True, True, False)

    References:
        Lecuyer et al., IEEE S&P 2019.
    """
    def ok(size: float) -> bool:
        eps = pixeldp_epsilon(size, sigma, sensitivity, delta, mechanism)
        if mechanism == "gaussian" and eps > 1:
            return False
        return pixeldp_robust(e_lower_top, e_upper_second, eps, delta if mechanism == "gaussian" else 0.0)

    if not ok(1e-12):
        return 0.0
    lo, hi = 0.0, max_size
    if ok(hi):
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo

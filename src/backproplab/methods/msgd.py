"""MSGD: SGD noise as the gradient matrix times sampling noise.

Wu, Hu, Xiong, Huan, Braverman, Zhu, "On the Noisy Gradient Descent that Generalizes as SGD",
ICML 2020 (arXiv 1906.07405). With per-example losses l_1..l_n and gradient matrix
G = [grad l_1, ..., grad l_n] (d x n), a mini-batch gradient is G W, W the sampling vector (b entries 1/b,
the rest 0); so SGD = GD + G V with V = W - 1/n. Any random weight vector w with E[w] = 1/n gives a noisy
gradient descent whose noise covariance is G Cov[w] G^T, and because G w = grad sum_i w_i l_i, each noisy
gradient is ONE backward pass of a randomly weighted loss: no per-example gradients are formed.

Notation: C = (1/n) sum_i (g_i - g)(g_i - g)^T (gradient covariance), F = (1/n) sum_i g_i g_i^T (empirical
Fisher, uncentred). SGD with batch b drawn without replacement has noise covariance
(n - b) / (b (n - 1)) C. Each weighting below derives its default scale from (n, b); ``scale=`` overrides.

================  =============================================  ==========================================
name              weights w (per step)                           noise covariance G Cov[w] G^T
================  =============================================  ==========================================
``gd``            1/n                                            0
``sgd``           1/b on a batch of b drawn without replacement  (n - b)/(b (n - 1)) C
``msgd_cov``      (1 + s (e - mean e)) / n, e ~ N(0, I_n)        (s^2/n) C;  s^2 = (n - b)/b * n/(n - 1)
``msgd_fisher``   (1 + s e) / n                                  (s^2/n) F;  s^2 = n/b - 1
``msgd_bernoulli``1/b with probability b/n, independently        (1/b - 1/n) F
``msgd_fisher_b`` 1/n + s e_j / n on B random examples j          (s^2 B/n^2) F;  s^2 = n^2/(B b)  (Alg. 2)
``large_batch``   (1 + s e_j) / B on a batch of B                (n-B)/(B(n-1)) C + (s^2/B) F_B; s^2 = B/b - 1
================  =============================================  ==========================================

GLD (Gaussian Langevin-type dynamics) is not a weighting: :class:`GLD` adds isotropic noise sigma xi to
the GD gradient, sigma^2 d matched to the SGD noise trace tr((n - b)/(b (n - 1)) C), which it estimates
every ``every`` steps as the mean of |g_batch - g|^2 over ``probes`` mini-batches of size b (an unbiased
estimator of that trace); ``GLD(sigma=...)`` is the 'const' variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..train import loss_step


class LossWeighting:
    """A random per-example weighting. ``sample()`` draws, for one step, the examples to evaluate and
    their weights; ``weighted_loss(per_example_losses, weights)`` is the loss whose gradient is G w.

    Randomness comes from torch's global generator (seeded and checkpointed by the training loop) unless
    a ``generator`` is passed.

    Example:
        >>> import torch
        >>> w = MSGDFisher(n=100, batch_size=10)
        >>> idx, weights = w.sample(torch.Generator().manual_seed(0))
        >>> len(idx), round(w.scale ** 2, 6)                  # every example, s^2 = n/b - 1
        (100, 9.0)
        >>> losses = torch.rand(100)
        >>> torch.allclose(w.weighted_loss(losses[idx], weights), (losses[idx] * weights).sum())
        True

    References:
        Wu, Hu, Xiong, Huan, Braverman and Zhu, "On the noisy gradient descent that generalizes as SGD",
        ICML 2020 (arXiv:1906.07405).
    """

    name = "weighting"
    all_examples = False  # True: sample() always returns every index in order (the step then slices, not gathers)

    def __init__(self, n: int, batch_size: int = 1, scale: float | None = None):
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size={batch_size} must be in [1, n={n}]")
        self.n, self.b = n, batch_size
        self.scale = self.default_scale() if scale is None else float(scale)

    def default_scale(self) -> float:
        return 0.0

    def sample(self, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(indices, weights) for one step: the gradient is sum_k weights[k] grad l_{indices[k]}."""
        raise NotImplementedError

    @staticmethod
    def weighted_loss(per_example_losses: Tensor, weights: Tensor) -> Tensor:
        """sum_i w_i l_i: its gradient is G w (one backward pass)."""
        return (per_example_losses * weights.to(per_example_losses.dtype)).sum()

    def dense(self, generator: torch.Generator | None = None) -> Tensor:
        """The full weight vector w in R^n of one draw (for analysis and tests)."""
        idx, w = self.sample(generator)
        return torch.zeros(self.n, dtype=w.dtype).index_add_(0, idx, w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, batch_size={self.b}, scale={self.scale:.4g})"


def _all(n: int, device) -> Tensor:
    return torch.arange(n, device=device)


class GD(LossWeighting):
    """Gradient descent as a weighting: w = 1/n on every example, no noise.

    Example:
        >>> idx, w = GD(n=4).sample()
        >>> idx.tolist(), w.tolist()
        ([0, 1, 2, 3], [0.25, 0.25, 0.25, 0.25])
    """
    name = "gd"
    all_examples = True

    def sample(self, generator=None, device="cpu"):
        return _all(self.n, device), torch.full((self.n,), 1.0 / self.n, device=device)


class SGD(LossWeighting):
    """SGD as a weighting: w = 1/b on b examples drawn without replacement; noise covariance (n - b)/(b (n - 1)) C.

    Example:
        >>> import torch
        >>> idx, w = SGD(n=10, batch_size=3).sample(torch.Generator().manual_seed(0))
        >>> len(set(idx.tolist())), round(float(w.sum()), 6)
        (3, 1.0)
    """
    name = "sgd"

    def sample(self, generator=None, device="cpu"):
        idx = torch.randperm(self.n, generator=generator)[: self.b].to(device)
        return idx, torch.full((self.b,), 1.0 / self.b, device=device)


class MSGDCov(LossWeighting):
    """w = (1 + s (e - mean e)) / n: noise covariance (s^2/n) C; SGD-matched s^2 = (n - b)/b * n/(n - 1).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> wc = MSGDCov(n=50, batch_size=5)
        >>> w = torch.stack([wc.dense(g) for _ in range(2000)])
        >>> torch.allclose(w.sum(1), torch.ones(2000))         # e - mean e: the weights always sum to 1
        True
        >>> abs(w.var(0).mean().item() * 50 ** 2 - wc.scale ** 2 * (1 - 1 / 50)) < 0.3
        True

    References:
        Wu et al., ICML 2020 (arXiv:1906.07405), Section 4 (MSGD-Cov).
    """

    name = "msgd_cov"
    all_examples = True

    def default_scale(self) -> float:
        return math.sqrt((self.n - self.b) / self.b * self.n / (self.n - 1)) if self.n > 1 else 0.0

    def sample(self, generator=None, device="cpu"):
        e = torch.randn(self.n, generator=generator)
        return _all(self.n, device), ((1 + self.scale * (e - e.mean())) / self.n).to(device)


class MSGDFisher(LossWeighting):
    """w = (1 + s e) / n: noise covariance (s^2/n) F; s^2 = n/b - 1.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.stack([MSGDFisher(n=50, batch_size=5).dense(g) for _ in range(4000)])
        >>> abs(w.mean().item() - 1 / 50) < 1e-3, abs(w.var(0).mean().item() * 50 ** 2 - 9) < 0.5   # s^2 = 9
        (True, True)

    References:
        Wu et al., ICML 2020 (arXiv:1906.07405), Section 4 (MSGD-Fisher).
    """

    name = "msgd_fisher"
    all_examples = True

    def default_scale(self) -> float:
        return math.sqrt(self.n / self.b - 1)

    def sample(self, generator=None, device="cpu"):
        e = torch.randn(self.n, generator=generator)
        return _all(self.n, device), ((1 + self.scale * e) / self.n).to(device)


class MSGDBernoulli(LossWeighting):
    """w_i = 1/b with probability b/n, independently: noise covariance (1/b - 1/n) F.

    ``scale`` multiplies the deviation from 1/n (1 = the SGD-matched sampling rate).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.stack([MSGDBernoulli(n=50, batch_size=5).dense(g) for _ in range(4000)])
        >>> torch.allclose(w.unique(), torch.tensor([0.0, 0.2]))      # 1/b or 0
        True
        >>> abs((w > 0).float().mean().item() - 5 / 50) < 0.01  # kept with probability b/n
        True

    References:
        Wu et al., ICML 2020 (arXiv:1906.07405), Section 4 (MSGD-Bernoulli).
    """

    name = "msgd_bernoulli"

    def default_scale(self) -> float:
        return 1.0

    def sample(self, generator=None, device="cpu"):
        keep = torch.rand(self.n, generator=generator) < self.b / self.n
        w = 1.0 / self.n + self.scale * (keep.to(torch.get_default_dtype()) / self.b - 1.0 / self.n)
        if self.scale == 1.0:
            idx = keep.nonzero().flatten()
            return idx.to(device), w[idx].to(device)
        return _all(self.n, device), w.to(device)


class MSGDFisherB(LossWeighting):
    """Mini-batch MSGD-[Fisher-B] (Algorithm 2): the full gradient plus Gaussian weights on only B random
    examples, w = 1/n + s e_j / n (j in the B), noise covariance (s^2 B / n^2) F; s^2 = n^2/(B b).

    Example:
        >>> import torch
        >>> wb = MSGDFisherB(n=100, batch_size=10, noise_batch=20)
        >>> w = wb.dense(torch.Generator().manual_seed(0))
        >>> int((w != 1 / 100).sum()), round(wb.scale ** 2, 6)    # noise on B = 20 examples, s^2 = n^2/(B b)
        (20, 50.0)

    References:
        Wu et al., ICML 2020 (arXiv:1906.07405), Algorithm 2.
    """

    name = "msgd_fisher_b"
    all_examples = True

    def __init__(self, n: int, batch_size: int = 1, noise_batch: int = 0, scale: float | None = None):
        self.B = noise_batch or batch_size
        super().__init__(n, batch_size, scale)

    def default_scale(self) -> float:
        return math.sqrt(self.n**2 / (self.B * self.b))

    def sample(self, generator=None, device="cpu"):
        w = torch.full((self.n,), 1.0 / self.n)
        j = torch.randperm(self.n, generator=generator)[: self.B]
        w[j] += self.scale * torch.randn(self.B, generator=generator) / self.n
        return _all(self.n, device), w.to(device)


class LargeBatchWeighted(LossWeighting):
    """A batch of B (without replacement) whose losses get N(1, s^2) weights, mimicking batch b:
    w_j = (1 + s e_j) / B; s^2 = B/b - 1 (``batch_size`` = b, ``large_batch`` = B).

    Example:
        >>> import torch
        >>> wl = LargeBatchWeighted(n=1000, batch_size=10, large_batch=40)
        >>> idx, w = wl.sample(torch.Generator().manual_seed(0))
        >>> len(idx), len(set(idx.tolist())), round(wl.scale ** 2, 6)     # B = 40 distinct, s^2 = B/b - 1
        (40, 40, 3.0)

    References:
        Wu et al., ICML 2020 (arXiv:1906.07405), Section 6.
    """

    name = "large_batch"

    def __init__(self, n: int, batch_size: int = 1, large_batch: int = 0, scale: float | None = None):
        self.B = large_batch or batch_size
        if not batch_size <= self.B <= n:
            raise ValueError(f"need batch_size <= large_batch <= n, got {batch_size}, {self.B}, {n}")
        super().__init__(n, batch_size, scale)

    def default_scale(self) -> float:
        return math.sqrt(self.B / self.b - 1)

    def sample(self, generator=None, device="cpu"):
        idx = torch.randperm(self.n, generator=generator)[: self.B]
        w = (1 + self.scale * torch.randn(self.B, generator=generator)) / self.B
        return idx.to(device), w.to(device)


WEIGHTINGS: dict[str, type[LossWeighting]] = {c.name: c for c in (GD, SGD, MSGDCov, MSGDFisher, MSGDBernoulli,
                                                                   MSGDFisherB, LargeBatchWeighted)}


def weighted_gradient_step(weighting: LossWeighting, chunk_size: int = 2048) -> Callable:
    """A training-loop step: draw (indices, weights), accumulate grad sum_i w_i l_i over chunks of the
    *training set* (memory bounded by ``chunk_size`` examples), then ``optimizer.step()``.

    The loop's own batch is ignored (run it with ``optimizer="gd"``, a full batch, so one step = one draw).

    Example:
        >>> from backproplab import build_model, fit, load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=200)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(32,))
        >>> rows = fit(model, data, TrainConfig(optimizer="gd", lr=0.5, max_steps=20, eval_every=20),
        ...            step=weighted_gradient_step(MSGDBernoulli(n=200, batch_size=20)))
        >>> rows[-1]["step"], rows[-1]["test_acc"] > 0.5
        (20, True)

    References:
        Wu et al., ICML 2020 (arXiv:1906.07405): G w = grad sum_i w_i l_i, one backward pass per noisy gradient.
    """

    def draws(batch, state):
        data = state.data
        if weighting.n != len(data.x_train):
            raise ValueError(f"{type(weighting).__name__} was built for n={weighting.n} examples but the training set "
                             f"has {len(data.x_train)}; build it with n=len(data.x_train)")
        idx, w = weighting.sample(device=data.x_train.device)
        for s in range(0, len(idx), chunk_size):
            if weighting.all_examples:  # a view of the data, no copy
                xs, ys = data.x_train[s:s + chunk_size], data.y_train[s:s + chunk_size]
            else:
                i = idx[s:s + chunk_size]
                xs, ys = data.x_train[i], data.y_train[i]
            yield (xs, ys, w[s:s + chunk_size]), 1.0

    def weighted(part, state) -> Tensor:
        xs, ys, wc = part
        return weighting.weighted_loss(state.loss_fn(state.net(xs), ys, reduction="none"), wc)

    return loss_step(weighted, parts=draws)


def _training_set_chunks(chunk_size: int):
    def parts(batch, state):
        data, n = state.data, len(state.data.x_train)
        for s in range(0, n, chunk_size):
            yield (data.x_train[s:s + chunk_size], data.y_train[s:s + chunk_size]), 1.0
    return parts


class GLD:
    """Gradient descent plus isotropic Gaussian noise: g_GD + sigma xi, xi ~ N(0, I_d).

    ``GLD(n, batch_size=b)`` (dynamic): sigma^2 = T / d with T the SGD noise trace, re-estimated every
    ``every`` steps as mean_k |g_{B_k} - g|^2 over ``probes`` mini-batches B_k of size b drawn without
    replacement (E|g_B - g|^2 = tr Cov_SGD, so the estimator is unbiased). The defaults, 100 probes every
    10 steps, are the authors'. ``GLD(n, sigma=s)``: constant.

    Example:
        >>> from backproplab import build_model, fit, load_dataset, TrainConfig
        >>> data = load_dataset("digits", n_train=200)
        >>> model = build_model("mlp", data.input_shape, 10, widths=(32,))
        >>> gld = GLD(n=200, batch_size=20, every=5, probes=10)         # dynamic: sigma from SGD's noise trace
        >>> _ = fit(model, data, TrainConfig(optimizer="gd", lr=0.5, max_steps=10), step=gld.training_step(),
        ...         callbacks=[gld])
        >>> gld.trace > 0 and gld.sigma > 0
        True

    References:
        Wu et al., ICML 2020 (arXiv:1906.07405), Section 5 (GLD dynamic / const); Zhu, Wu, Yu, Wu and Ma,
        "The anisotropic noise in stochastic gradient descent", ICML 2019.
    """

    def __init__(self, n: int, batch_size: int = 1, sigma: float | None = None, every: int = 10, probes: int = 100):
        self.n, self.b, self.const_sigma, self.every, self.probes = n, batch_size, sigma, every, probes
        self.sigma = sigma if sigma is not None else 0.0
        self.trace = math.nan
        self.steps = 0

    def state_dict(self) -> dict:
        return {"sigma": self.sigma, "trace": self.trace, "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        self.sigma, self.trace, self.steps = sd["sigma"], sd["trace"], sd["steps"]

    @staticmethod
    def _flat_grad(params: list[Tensor]) -> Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])

    def estimate_trace(self, model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor,
                       full_grad: Tensor, generator: torch.Generator | None = None) -> float:
        """mean over ``probes`` mini-batches of |g_batch - g_full|^2 (uses and restores .grad)."""
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        total = 0.0
        for _ in range(self.probes):
            idx = torch.randperm(self.n, generator=generator)[: self.b].to(x.device)
            grads = torch.autograd.grad(loss_fn(model(x[idx]), y[idx]), params, allow_unused=True)
            g = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(grads, params)])
            total += float((g - full_grad).pow(2).sum())
        for p, s in zip(params, saved):
            p.grad = s
        return total / self.probes

    def training_step(self, chunk_size: int = 2048) -> Callable:
        """A training-loop step (with ``optimizer="gd"``): full gradient, then noise, then ``optimizer.step()``."""

        def full_loss(part, state) -> Tensor:
            xs, ys = part
            return state.loss_fn(state.net(xs), ys, reduction="sum") / len(state.data.x_train)

        def add_noise(state) -> None:
            data = state.data
            params = [p for p in state.model.parameters() if p.requires_grad]
            if self.const_sigma is None and self.steps % self.every == 0:
                self.trace = self.estimate_trace(state.net, state.loss_fn, data.x_train, data.y_train,
                                                 self._flat_grad(params))
                self.sigma = math.sqrt(self.trace / sum(p.numel() for p in params))
            with torch.no_grad():
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(torch.randn_like(p), alpha=self.sigma)

        def count(state) -> None:
            self.steps += 1

        return loss_step(full_loss, parts=_training_set_chunks(chunk_size), before_step=add_noise, after_step=count)


def sgd_noise_covariance(per_example_grads: Tensor, batch_size: int) -> Tensor:
    """(n - b)/(b (n - 1)) C for per-example gradients (n, d): SGD's exact noise covariance.

    Example:
        >>> import torch
        >>> g = torch.randn(6, 3, dtype=torch.float64)
        >>> batches = torch.combinations(torch.arange(6), 2)          # every batch of b = 2, without replacement
        >>> noise = torch.stack([g[b].mean(0) - g.mean(0) for b in batches])
        >>> torch.allclose(sgd_noise_covariance(g, 2), noise.T @ noise / len(batches))
        True
    """
    n = per_example_grads.shape[0]
    centred = per_example_grads - per_example_grads.mean(0)
    return (n - batch_size) / (batch_size * (n - 1)) * centred.T @ centred / n

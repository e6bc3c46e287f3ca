"""One seed path: every random stream of a run is derived from the run's seed and the stream's name.

A run has one integer seed. Each random stream it uses (the epoch shuffle, the DP noise, a data subset, the
canaries of an audit, ...) gets its own ``torch.Generator`` seeded by

    derive_seed(seed, purpose, *keys) = the first 8 bytes of SHA-256("backproplab", seed, purpose, keys) >> 2

(62 bits, so that a per-epoch offset stays inside torch's seed range), and is passed explicitly to what draws
from it, as optax passes ``key=`` and Opacus ``noise_generator=``. Arithmetic on seeds (``seed + epoch``,
``1000 + seed``) makes streams collide: seed k's second epoch would be shuffled like seed k + 1's first, and
two draws offset by the same constant would share their numbers. Hashing the name makes any two distinct
(seed, purpose, keys) independent for every practical purpose. The global generators (Python, NumPy, torch),
which build the model, are seeded with the seed itself by ``train.seed_everything``.

References:
    Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011 (counter-based
    streams keyed by a hash); JAX's ``jax.random.fold_in`` and NumPy's ``SeedSequence`` (named, independent
    child streams).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str, *keys: int | str) -> int:
    """The seed of stream ``purpose`` (with ``keys``, e.g. an epoch or a rank) of the run with ``seed``.

    Example:
        >>> derive_seed(0, "epoch-order") == derive_seed(0, "epoch-order")
        True
        >>> len({derive_seed(s, "epoch-order") + e for s in range(100) for e in range(100)})   # no collision
        10000
        >>> derive_seed(0, "dp-noise") != derive_seed(0, "dp-sampling", 0) < 2**62
        True

    References:
        NumPy's ``SeedSequence`` and JAX's ``fold_in`` (independent named child streams).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not purpose or not isinstance(purpose, str):
        raise ValueError(f"purpose must name the stream (a non-empty string), got {purpose!r}")
    text = "\x1f".join(["backproplab", str(seed), purpose, *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def derive(seed: int, purpose: str, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for stream ``purpose`` of the run with ``seed`` (see :func:`derive_seed`).

    Example:
        >>> import torch
        >>> a = torch.rand(3, generator=derive(1, "canaries"))
        >>> torch.equal(a, torch.rand(3, generator=derive(1, "canaries")))     # the same stream again
        True
        >>> torch.equal(a, torch.rand(3, generator=derive(2, "canaries")))     # another seed's
        False

    References:
        Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
    """
    return torch.Generator(device).manual_seed(derive_seed(seed, purpose, *keys))

"""Config fields that carry their meaning and their range where they are declared.

One declaration serves three readers: the dataclass (its default), the validators (``train.check_config`` for
:class:`~backproplab.train.TrainConfig`, ``experiments.check_values`` for an experiment's config, both before
anything trains) and ``backproplab run NAME --help`` (the ``help`` line and the range in words).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, *, ge: float | None = 0, gt: float | None = None, lt: float | None = None,
           le: float | None = None) -> Any:
    """A config field with its meaning and its range, declared where the field is.

    ``help`` is the one line ``backproplab run NAME --help`` prints. The bounds apply to a number and to each
    item of a list of numbers: ``ge`` (default 0: no config number is negative; None: no lower bound), ``gt``,
    ``lt``, ``le``; every number must also be finite and fit float32. The validators enforce them before
    anything trains.

    Example:
        >>> from dataclasses import dataclass, fields
        >>> @dataclass
        ... class Demo:
        ...     epochs: int = option(3, "training epochs", ge=1)
        >>> fields(Demo)[0].metadata["ge"], fields(Demo)[0].metadata["help"], Demo().epochs
        (1, 'training epochs', 3)

    References:
        Python's ``dataclasses.field(metadata=...)``, the place the standard library gives such annotations.
    """
    return dataclasses.field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "lt": lt, "le": le})

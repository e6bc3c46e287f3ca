"""Process-group helpers in one place: rank and world size, joining the group torchrun describes, leaving it.

Every module that asks "which rank am I" asks :func:`rank_and_world`; ``backproplab.train`` re-exports
:func:`init_distributed`, :func:`shutdown_distributed` and :func:`leave_distributed` for scripts.

Example:
    >>> rank_and_world()  # outside torchrun
    (0, 1)
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group.

    Example:
        >>> rank_and_world()                  # a plain process: no group
        (0, 1)
    """
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank() -> int:
    """This process's rank (0 outside a process group).

    Example:
        >>> rank()
        0
    """
    return rank_and_world()[0]


def world_size() -> int:
    """The process group's size (1 outside one).

    Example:
        >>> world_size()
        1
    """
    return rank_and_world()[1]


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world size). The group is
    left at interpreter exit if the script does not call :func:`shutdown_distributed` itself: a rank
    that exits with gloo's threads still running can abort and fail the whole torchrun job.

    Example:
        Outside torchrun (no ``WORLD_SIZE`` above 1) it joins nothing: one process of rank 0.

        >>> import os
        >>> "WORLD_SIZE" in os.environ, init_distributed(), dist.is_initialized()
        (False, (0, 1), False)
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        _leave_group_at_exit()
    return rank_and_world()


def _leave_group_at_exit() -> None:
    """At interpreter exit, leave the group: after meeting the other ranks when this one ends normally
    (destroying it while a peer still talks can abort too), at once after an uncaught exception (the
    peers may never come)."""
    crashed = []
    previous = sys.excepthook

    def note_crash(*exc_info):
        crashed.append(True)
        previous(*exc_info)

    sys.excepthook = note_crash
    atexit.register(lambda: shutdown_distributed(wait=not crashed))


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group cleanly: a rank that exits with gloo's threads still running can abort
    ("terminate called without an active exception") and fail the whole torchrun job. ``wait``: meet
    the other ranks first (not after an error, when they may never come). Garbage is collected after: objects
    in reference cycles (a training state holding a DistributedDataParallel wrapper, say) can keep the group
    alive past ``destroy_process_group`` until the interpreter's finalization.

    Example:
        Without a process group it does nothing, so a script may call it unconditionally:

        >>> shutdown_distributed(), dist.is_initialized()
        (None, False)
    """
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def leave_distributed(code: int = 0) -> NoReturn:
    """End this rank's process with ``code``: meet the other ranks, leave the group, flush stdout, stderr and
    logging, then exit without the interpreter's finalization (``os._exit``).

    Why: gloo's C++ process group can outlive ``destroy_process_group`` (C++ objects such as DDP's reducer,
    hooked on the model's parameters, hold it) and is then destroyed during finalization, where a rank has
    been seen to abort ("terminate called without an active exception", SIGABRT) now and then, failing the
    torchrun job after all its work was written. Make it the last line of a script whose ranks have closed
    every file they wrote; ``backproplab`` under torchrun ends this way itself.

    Example:
        The process ends with the code given, its output flushed first:

        >>> import subprocess, sys
        >>> script = "from backproplab.dist import leave_distributed; print('written', end=''); leave_distributed(3)"
        >>> done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        >>> done.returncode, done.stdout
        (3, 'written')
    """
    import logging

    shutdown_distributed()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

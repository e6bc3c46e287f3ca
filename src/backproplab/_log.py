"""The library's messages (a model changed for DP-SGD, a run diverged, stale runs, Ray started): the
``backproplab`` logger, not ``print``.

By default they go to standard error as plain lines, at INFO, and not on to the root logger (so a notebook or
script that configures logging sees each once). To silence them:
``logging.getLogger("backproplab").setLevel(logging.WARNING)``; to route them into your own logging setup:
``logging.getLogger("backproplab").handlers.clear()`` and ``.propagate = True``.
"""

from __future__ import annotations

import logging
import sys


class _CurrentStderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when the message is logged (a test's capture, a notebook's stream),
    not the one of import time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


logger = logging.getLogger("backproplab")
if not logger.handlers:
    _handler = _CurrentStderr()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

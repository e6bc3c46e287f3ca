"""Callbacks that write each evaluation's metrics where other tools read them: CSV and TensorBoard.

``fit`` already appends every evaluation to ``metrics.jsonl``; these add the same rows (the numbers of
``state.history[-1]``) to ``metrics.csv`` (a spreadsheet, pandas) or to TensorBoard event files
(``tensorboard --logdir DIR``; needs ``pip install backproplab[tensorboard]``). Both are rewritten or
purged from the restored history when a run resumes, so a crash leaves no duplicate rows. In the lab:
``backproplab run NAME --log csv,tensorboard``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from . import _io

LOGGERS = ("csv", "tensorboard")


def _numbers(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class CSVLogger:
    """Appends each evaluation to ``path`` (a CSV with a header). Rows gaining a new column rewrite the
    file from the history with the widened header; resuming rewrites it from the restored history.

    Example:
        >>> import csv
        >>> from backproplab import build_model, load_dataset
        >>> from backproplab.train import TrainConfig, fit
        >>> data = load_dataset("digits", n_train=100)
        >>> rows = fit(build_model("mlp", data.input_shape, 10, widths=(8,)), data,
        ...            TrainConfig(epochs=2, batch_size=50), callbacks=[CSVLogger("metrics.csv")])
        >>> table = list(csv.DictReader(open("metrics.csv")))
        >>> len(table) == len(rows), float(table[-1]["test_acc"]) == rows[-1]["test_acc"]
        (True, True)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.columns: list[str] = []

    def _rewrite(self, history: list[dict]) -> None:
        self.columns = []
        for row in history:
            self.columns += [k for k in row if k not in self.columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, restval="")
        writer.writeheader()
        writer.writerows(history)
        _io.write_text(self.path, buf.getvalue())

    def on_train_start(self, state: Any) -> None:
        if state.rank == 0:
            self._rewrite(state.history)

    def on_eval(self, state: Any) -> None:
        if state.rank != 0:
            return
        row = state.history[-1]
        if not self.columns or any(k not in self.columns for k in row):
            return self._rewrite(state.history)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)


class TensorBoardLogger:
    """Writes each evaluation's numbers as TensorBoard scalars (tag = metric name, step = training step).

    Example:
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> from backproplab import build_model, load_dataset
        >>> from backproplab.train import TrainConfig, fit
        >>> data = load_dataset("digits", n_train=100)
        >>> rows = fit(build_model("mlp", data.input_shape, 10, widths=(8,)), data, TrainConfig(epochs=2),
        ...            callbacks=[TensorBoardLogger("tb")], progress=False)
        >>> events = EventAccumulator("tb")
        >>> _ = events.Reload()
        >>> [(e.step, round(e.value, 6)) for e in events.Scalars("test_acc")] == [
        ...     (r["step"], round(r["test_acc"], 6)) for r in rows]
        True
    """

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ImportError("the TensorBoard logger needs the tensorboard package: pip install "
                              "'backproplab[tensorboard]' (or pip install tensorboard)") from e
        self.log_dir = str(log_dir)
        self.writer = None

    def on_train_start(self, state: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if state.rank != 0:
            return
        if not state.history:  # starting over (no checkpoint): a crashed attempt's events would repeat its steps
            for old in Path(self.log_dir).glob("events.out.tfevents.*"):
                old.unlink()
        # on resume, events logged after the checkpoint's step are dropped
        self.writer = SummaryWriter(self.log_dir, purge_step=state.step + 1 if state.history else None)

    def on_eval(self, state: Any) -> None:
        if self.writer is None:
            return
        row = state.history[-1]
        for key, value in _numbers(row).items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def on_train_end(self, state: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def make_loggers(names: str | list[str] | tuple[str, ...], out_dir: str | os.PathLike) -> list[Any]:
    """``"csv,tensorboard"`` -> the logger callbacks writing into ``out_dir`` (``metrics.csv``, ``tensorboard/``).

    Example:
        >>> [type(x).__name__ for x in make_loggers("csv", "run")]
        ['CSVLogger']
        >>> make_loggers("csv,csv", "run")
        Traceback (most recent call last):
        ...
        ValueError: logger(s) 'csv' named twice: every event would be written twice
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"logger(s) {', '.join(map(repr, twice))} named twice: every event would be written twice")
    if unknown:
        raise ValueError(f"unknown logger(s) {', '.join(map(repr, unknown))}; available: {', '.join(LOGGERS)}")
    out = Path(out_dir)
    return [CSVLogger(out / "metrics.csv") if n == "csv" else TensorBoardLogger(out / "tensorboard") for n in names]

"""JSON-lines metric logging and progress bars for training loops.

Every training script writes ``<workdir>/metrics.jsonl``: one JSON object per line with a
``step`` key and the metric values of that step, flushed as it is written so that a killed
run loses nothing already logged. On resume, lines with a step beyond the restored
checkpoint are dropped, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Iterable, Mapping

import numpy as np
import tqdm
from absl import logging as absl_logging


def _to_python(value: Any) -> Any:
    array = np.asarray(value)
    if array.ndim == 0:
        item = array.item()
        if isinstance(item, float) and not math.isfinite(item):
            return str(item)
        return item
    return array.tolist()


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` lines to a JSON-lines file.

    Args:
      path: the ``.jsonl`` file.
      resume_step: when resuming from a checkpoint at this step, lines with a larger step
        (logged after that checkpoint by the interrupted run) are removed first. None keeps
        the file as it is (and creates it when absent).
      enabled: False makes a writer that touches no file (``write`` still returns the
        line): the other processes of a multi-process run, whose metrics process 0
        writes once.
    """

    def __init__(self, path: str | pathlib.Path, *, resume_step: int | None = None,
                 enabled: bool = True):
        self.path = pathlib.Path(path)
        self.enabled = enabled
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
            tmp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.write_text("")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Writes one line (device arrays are fetched here, so call it only on log steps)."""
        line = {"step": int(step), "time": round(time.time(), 3)}
        line.update({k: _to_python(v) for k, v in metrics.items()})
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
        return line

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Reads a metrics file written by `MetricWriter`; a torn last line is ignored."""
    lines = []
    for raw in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
             desc: str | None = None, disable: bool | None = None) -> tqdm.tqdm:
    """A tqdm bar that stays quiet when stderr is not a terminal unless asked otherwise."""
    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm.tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable,
                     dynamic_ncols=True, leave=True)


def format_metrics(metrics: Mapping[str, Any], digits: int = 4) -> str:
    """``"loss=0.1234 psnr=28.1"`` for a progress bar postfix or a log line."""
    parts = []
    for key, value in metrics.items():
        value = _to_python(value)
        parts.append(f"{key}={value:.{digits}g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def quiet_library_logs(*, keep_info: bool = False) -> None:
    """Shows library log records (orbax, tfds) from WARNING up, unless ``keep_info``.

    absl's default verbosity is INFO, at which orbax prints several lines per checkpoint and
    tfds one per data set load, burying the runs' own progress lines. Entry points call it
    first, with ``keep_info=flags.FLAGS["verbosity"].present`` so that ``--verbosity=0``
    (or ``-v 0``) brings the INFO records back; the library reads no flags itself.
    """
    if not keep_info:
        absl_logging.set_verbosity(absl_logging.WARNING)

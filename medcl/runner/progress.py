"""Compact progress lines for pipelines and sweeps (instead of Ray's tables and log noise)."""
from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

__all__ = ["ProgressCallback"]


def _duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``4000`` -> ``1h06m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressCallback(Callback):
    """Prints one line per finished epoch and per finished trial, with an ETA per trial and for the run.

    The run's ETA is the time since the first trial started, scaled by the trials still to
    finish (``total``): it averages over the run's concurrency and its mix of short and long
    trials, so it settles after a few trials.

    Args:
        quiet: Print only finished trials.
        stream: Where to write (stderr by default, so stdout keeps the results).
        total: Number of trials in the whole run (all waves), for the "done k/N" count.
    """

    def __init__(self, quiet: bool = False, stream: Any = None, total: int | None = None) -> None:
        self.quiet = quiet
        self.total = total
        self.stream = stream or sys.stderr
        self._start: dict[str, float] = {}
        self._last: dict[str, int] = {}  # trial id -> epoch last printed
        self._done = 0
        self._run_start: float | None = None

    def _name(self, trial: Any) -> str:
        return str(trial.config.get("job") or trial.config.get("trial") or trial.trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start[trial.trial_id] = time.monotonic()
        if self._run_start is None:
            self._run_start = self._start[trial.trial_id]
        if not self.quiet:
            print(f"[start] {self._name(trial)}", file=self.stream, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.quiet or "epoch" not in result:
            return
        epoch = int(result["epoch"]) + 1
        # A stage on a TorchTrainer reports its last epoch twice (the epoch, then the hand-over checkpoint).
        if self._last.get(trial.trial_id) == epoch:
            return
        self._last[trial.trial_id] = epoch
        total = int(trial.config.get("max_epochs", 0) or result.get("max_epochs", 0) or 0)
        elapsed = time.monotonic() - self._start.get(trial.trial_id, time.monotonic())
        eta = f", eta {elapsed / epoch * (total - epoch):.0f}s" if total and epoch < total else ""
        loss = result.get("train/loss")
        loss_text = f" loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
        of_total = f"/{total}" if total else ""
        print(f"  {self._name(trial)}: epoch {epoch}{of_total}{loss_text}{eta}", file=self.stream, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done += 1
        now = time.monotonic()
        elapsed = now - self._start.get(trial.trial_id, now)
        total = self.total or len(trials)
        run = now - (self._run_start if self._run_start is not None else now)
        left = f", ~{_duration(run / self._done * (total - self._done))} to go" if self._done < total else ""
        print(f"[done {self._done}/{total}] {self._name(trial)} in {elapsed:.0f}s (run: {_duration(run)}{left})",
              file=self.stream, flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[error] {self._name(trial)}: see {trial.local_path}", file=self.stream, flush=True)

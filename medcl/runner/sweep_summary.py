"""What a sweep ended with: one line per trial (status, swept values, metric), the best trial, what to resume.

Example:
    >>> print(run_sweep(load_sweep("tune_spaces/quickstart_temperature.yaml")).summary())  # doctest: +SKIP
    sweep quickstart-temperature: 3 trials (3 finished), metric test/dice_2d (max)
    best: trial 5c1e2_00001, test/dice_2d = 0.7312
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcl.config.paths import get_path
from medcl.config.sweep import SweepConfig

__all__ = ["SweepResult", "TrialSummary", "format_value", "summarise", "trial_values"]


@dataclass(frozen=True)
class TrialSummary:
    """One trial of a sweep.

    Attributes:
        trial_id: Ray Tune trial id, also the name of the trial's MLflow run.
        status: FINISHED, KILLED (stopped early by the scheduler), ERROR (failed) or
            UNFINISHED (interrupted or not started; ``resume=True`` continues it).
        values: The swept keys' values.
        metric: The sweep metric's last value, or None.
        run_id: The trial's MLflow run, or None.
        error: The error of a failed trial.
    """

    trial_id: str
    status: str
    values: dict[str, Any]
    metric: float | None
    run_id: str | None
    error: str | None = None


def format_value(value: Any) -> str:
    """A swept value for a table or a progress line: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SweepResult:
    """Outcome of :func:`~medcl.runner.sweep.run_sweep`; ``summary()`` is what ``medcl sweep`` prints."""

    name: str
    metric: str
    mode: str
    path: str
    source: str
    parent_run_id: str
    tracking_uri: str
    trials: tuple[TrialSummary, ...]

    @property
    def best(self) -> TrialSummary | None:
        """The trial with the best finite metric value (``mode``), or None."""
        scored = [t for t in self.trials if t.metric is not None and math.isfinite(t.metric)]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=lambda t: t.metric)

    @property
    def errors(self) -> list[TrialSummary]:
        """Trials that failed."""
        return [t for t in self.trials if t.error is not None]

    @property
    def unfinished(self) -> list[TrialSummary]:
        """Trials that failed, were interrupted or never started: ``resume=True`` continues them."""
        return [t for t in self.trials if t.status in ("ERROR", "UNFINISHED")]

    def summary(self) -> str:
        """Best trial's values and metric, then one line per trial."""
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        status = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        lines = [f"sweep {self.name}: {len(self.trials)} trials ({status}), metric {self.metric} ({self.mode})"]
        best = self.best
        if best is None:
            lines.append(f"best: none (no trial reported {self.metric})")
        else:
            lines.append(f"best: trial {best.trial_id}, {self.metric} = {best.metric:.4g}")
            lines.extend(f"  {k} = {format_value(v)}" for k, v in best.values.items())
        keys = list(self.trials[0].values) if self.trials else []
        header = ["trial", "status", *keys, self.metric]
        rows = [[t.trial_id, t.status, *(format_value(t.values.get(k)) for k in keys),
                 "-" if t.metric is None else f"{t.metric:.4g}"] for t in self.trials]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])
        lines.append("")
        lines.append(f"MLflow parent run {self.parent_run_id} in {self.tracking_uri}")
        for t in self.errors:
            lines.append(f"failed: trial {t.trial_id}: {t.error}")
        if self.unfinished:
            lines.append(f"{len(self.unfinished)} trial(s) not finished; continue the sweep with: "
                         f"medcl sweep {self.source} --resume")
        return "\n".join(lines)


def trial_values(sweep: SweepConfig, config: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of this trial, from Tune's nested config."""
    return {key: get_path(config, key) for key in sweep.space}


def summarise(sweep: SweepConfig, grid: Any, states: dict[str, str], target: Any, parent: str,
              root: str) -> SweepResult:
    """The :class:`SweepResult` of a fitted sweep, its statuses from ``states`` (trial id -> Tune state) and MLflow."""
    from medcl import tracking as mlt

    runs = mlt.search_runs(target, parent_run_id=parent)
    by_name = {row["run_name"]: row for _, row in runs.iterrows()} if len(runs) else {}
    trials = []
    for result in grid:
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
        run = by_name.get(trial_id)
        value = (result.metrics or {}).get(sweep.metric)
        if value is None and run is not None and f"metrics.{sweep.metric}" in run:
            value = run[f"metrics.{sweep.metric}"]
        value = float(value) if value is not None and not _isnan(value) else None
        error = None
        if result.error is not None:
            error = str(result.error).strip().splitlines()[-1][:300] or type(result.error).__name__
        if error or states.get(trial_id) == "ERROR":
            status = "ERROR"
        elif states.get(trial_id) != "TERMINATED":  # interrupted, or never started
            status = "UNFINISHED"
        else:  # FINISHED, or KILLED when the scheduler stopped it
            status = run["status"] if run is not None else "FINISHED"
        trials.append(TrialSummary(trial_id=trial_id, status=status, values=trial_values(sweep, result.config),
                                   metric=value, run_id=run["run_id"] if run is not None else None, error=error))
    trials.sort(key=lambda t: t.trial_id)
    return SweepResult(name=sweep.name, metric=sweep.metric, mode=sweep.mode, path=root, source=str(sweep.source),
                       parent_run_id=parent, tracking_uri=target.tracking_uri, trials=tuple(trials))


def _isnan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True

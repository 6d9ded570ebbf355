"""Hyperparameter sweeps: Ray Tune trials over a search space from ``tune_spaces/*.yaml``.

Each trial runs a whole method chain (stages in sequence, each starting from the
previous stage's final checkpoint) or one stage, inline in the trial for one
CPU worker (or a GPU fraction), or through a ``TorchTrainer`` for several
workers — as the pipeline runner does; how a chain trial checkpoints and
resumes is described in :mod:`medcl.train.sweep_trial`. ASHA can stop
single-stage trials early on a per-epoch metric (``train/loss``).

Sweep directory ``<storage_path>/<name>``: ``tune/`` (the Tune experiment),
``train/`` (Train runs), ``sweep.json`` (MLflow parent run id and a
fingerprint of the configuration). ``run_sweep(..., resume=True)`` restores the
experiment with ``Tuner.restore(..., resume_errored=True)``: finished trials
are not run again, unfinished and errored ones continue from their
checkpoints, and each trial's MLflow run is found again by name (the trial id).

MLflow: one parent run per sweep (``medcl.role=sweep``), one child run per
trial (``medcl.role=trial``: all resolved parameters, final metrics), and for
chains of several stages one run per stage under the trial's run. Runs of
trials that were killed (ASHA, a lost process) are ended KILLED with the sweep.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcl.pipeline_config import resolve_storage, with_scaling
from medcl.storage_json import read_json, write_json
from medcl.sweep_config import Distribution, SweepConfig, load_sweep

logger = logging.getLogger(__name__)

__all__ = ["SweepConfig", "SweepResult", "TrialSummary", "load_sweep", "run_sweep"]

_SIDECAR = "sweep.json"


# ------------------------------------------------------------------ results ----
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


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SweepResult:
    """Outcome of :func:`run_sweep`; ``summary()`` is what ``medcl sweep`` prints."""

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
            lines.extend(f"  {k} = {_fmt(v)}" for k, v in best.values.items())
        keys = list(self.trials[0].values) if self.trials else []
        header = ["trial", "status", *keys, self.metric]
        rows = [[t.trial_id, t.status, *(_fmt(t.values.get(k)) for k in keys),
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


def _summarise(sweep: SweepConfig, grid: Any, states: dict[str, str], target: Any, parent: str,
               root: str) -> SweepResult:
    from medcl import tracking as mlt
    from medcl.train.sweep_trial import trial_values

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


# ------------------------------------------------------------------ the sweep ----
def _tune_domain(dist: Distribution) -> Any:
    from ray import tune

    if dist.kind == "grid":
        return tune.grid_search(list(dist.values))
    if dist.kind == "choice":
        return tune.choice(list(dist.values))
    if dist.kind == "uniform":
        return tune.uniform(dist.low, dist.high)
    if dist.kind == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    return tune.randint(int(dist.low), int(dist.high))


@dataclass(frozen=True)
class _TrialLabel:
    """``trial`` entry of the config: the trial's values in a few words, for progress lines."""

    keys: tuple[str, ...]

    def __call__(self, config: dict[str, Any]) -> str:
        parts = []
        for key in self.keys:
            node: Any = config
            for part in key.split("."):
                node = node[part]
            parts.append(f"{key.rsplit('.', 1)[-1]}={_fmt(node)}")
        return " ".join(parts)


def _param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's nested param space from the dotted keys (``stages.local.temperature``), plus a ``trial`` label."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in sweep.space.items():
        node = space
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _tune_domain(dist)
    space["trial"] = tune.sample_from(_TrialLabel(tuple(sweep.space)))
    return space


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _forget_pending_decisions(experiment: str) -> None:
    """Drop scheduling decisions that were waiting on a checkpoint save when the experiment state was written.

    Ray Tune (2.60) saves these with the experiment state and applies them after a
    restore: a trial that died while its checkpoint was being saved left a STOP
    that would end it, unfinished and not resumable, at its first checkpoint after
    ``--resume``. A restored experiment has no save in flight, so none applies.
    """
    import pyarrow.fs

    fs, base = (pyarrow.fs.FileSystem.from_uri(experiment) if "://" in experiment
                else (pyarrow.fs.LocalFileSystem(), experiment))
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base)):
        if not (info.base_name.startswith("experiment_state-") and info.base_name.endswith(".json")):
            continue
        with fs.open_input_file(info.path) as fh:
            state = json.loads(fh.readall().decode())
        runner = state.get("runner_data") or {}
        if not runner.get("_cached_trial_decisions") and not runner.get("_queued_trial_decisions"):
            continue
        logger.info("dropping stale trial decisions %s from %s", runner.get("_cached_trial_decisions"), info.path)
        runner["_cached_trial_decisions"], runner["_queued_trial_decisions"] = {}, {}
        text = json.dumps(state).encode()
        if "://" in experiment:
            with fs.open_output_stream(info.path) as fh:
                fh.write(text)
        else:
            tmp = Path(info.path + ".tmp")
            tmp.write_bytes(text)
            os.replace(tmp, info.path)


def _check_resumable(sweep: SweepConfig, root: str, sidecar: dict[str, Any] | None, started: bool,
                     resume: bool) -> None:
    if started and not resume:
        raise ValueError(f"sweep {sweep.name!r} already exists at {root}; continue it with "
                         f"`medcl sweep {sweep.source} --resume`, or start another one under a new name "
                         f"(`--set name={sweep.name}-2`)")
    if resume and not started:
        raise ValueError(f"nothing to resume: no sweep {sweep.name!r} at {root}; run it without --resume")
    if sidecar is not None:
        old, new = sidecar.get("fingerprint", {}), sweep.fingerprint()
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            raise ValueError(f"sweep {sweep.name!r} at {root} was started with another configuration (changed: "
                             f"{', '.join(changed)}); resume it with the configuration it started with, or give "
                             "the changed sweep a new name")


def run_sweep(sweep: SweepConfig, *, resume: bool = False, callbacks: list | None = None,
              num_workers: int | None = None, use_gpu: bool | None = None) -> SweepResult:
    """Run (or, with ``resume``, continue) a sweep on the current Ray instance.

    Args:
        sweep: From :func:`load_sweep`.
        resume: Continue the sweep of the same name: finished trials are kept, unfinished and
            failed ones continue from their latest checkpoints.
        callbacks: Ray Tune callbacks (progress display); used on resume too.
        num_workers: Ray Train workers per stage (default: the pipeline's ``scaling``).
        use_gpu: One GPU per trial (or per worker); default: the pipeline's ``scaling``
            or the sweep's ``resources.gpu``.

    Returns:
        The trials, their values and metric, the best one.

    Raises:
        ValueError: The sweep exists and ``resume`` is False, there is nothing to resume,
            or the sweep was started with a different configuration.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from medcl import tracking as mlt
    from medcl.pipeline import prepare_dataset
    from medcl.train.sweep_trial import TrialPlan, TrialStates, prebuild_streams, sweep_trial

    root = f"{resolve_storage(sweep.storage_path)}/{sweep.name}"
    experiment = f"{root}/tune"
    sidecar = read_json(root, _SIDECAR)
    can_restore = tune.Tuner.can_restore(experiment)
    _check_resumable(sweep, root, sidecar, sidecar is not None or can_restore, resume)

    pipeline = with_scaling(sweep.pipeline, num_workers=num_workers, use_gpu=use_gpu)
    dataset_dir = Path(prepare_dataset(pipeline)).resolve()
    pipeline = dataclasses.replace(pipeline, dataset=dataclasses.replace(pipeline.dataset, path=dataset_dir))
    sweep = dataclasses.replace(sweep, pipeline=pipeline)
    target = mlt.configure_tracking(tracking_uri=sweep.tracking.tracking_uri, experiment=sweep.tracking.experiment,
                                    workdir=sweep.tracking.workdir)
    if sidecar is not None:
        if sidecar["tracking_uri"] != target.tracking_uri:
            raise ValueError(f"sweep {sweep.name!r} logs to MLflow at {sidecar['tracking_uri']}, not "
                             f"{target.tracking_uri}; resume it with the same tracking settings")
        parent = sidecar["parent_run_id"]
        target.client().update_run(parent, status="RUNNING")
        logger.info("resuming sweep %s (MLflow run %s)", sweep.name, parent)
    else:
        parent = mlt.start_parent_run(
            target, sweep.name, tags={"medcl.role": "sweep", "medcl.dataset": str(dataset_dir)},
            params={"sweep": sweep.name, "pipeline": str(sweep.pipeline_path), "method": sweep.method or "none",
                    "stage": sweep.stage or "none", "chain": ">".join(sweep.chain), "metric": sweep.metric,
                    "mode": sweep.mode, "num_samples": sweep.num_samples, "num_trials": sweep.num_trials(),
                    "search_seed": sweep.search_seed, "scheduler": _describe_asha(sweep),
                    "space": {k: d.describe() for k, d in sweep.space.items()}})
        mlt.log_text(target, parent, sweep.source.read_text(), "sweep.yaml")
        mlt.log_text(target, parent, sweep.pipeline_path.read_text(), "pipeline.yaml")
        write_json(root, _SIDECAR, {"name": sweep.name, "parent_run_id": parent, "tracking_uri": target.tracking_uri,
                              "fingerprint": sweep.fingerprint()})

    if can_restore:
        _forget_pending_decisions(experiment)
    scaling = pipeline.scaling
    gpu = sweep.resources.gpu or (1.0 if scaling.use_gpu else 0.0)
    if gpu and not ray.cluster_resources().get("GPU"):
        logger.warning("trials ask for %g GPU but the Ray cluster has none (yet): they wait until one joins", gpu)
    inline = scaling.num_workers == 1
    if inline:
        resources = {"CPU": sweep.resources.cpu, **({"GPU": gpu} if gpu else {})}
    else:  # the trial only drives a TorchTrainer, whose workers hold the resources
        resources = {"CPU": 0.01}
        scaling = dataclasses.replace(scaling, cpus_per_worker=sweep.resources.cpu, use_gpu=gpu > 0)
    plan = TrialPlan(
        tracking={"target": {"tracking_uri": target.tracking_uri, "experiment": sweep.tracking.experiment,
                             "workdir": str(Path(sweep.tracking.workdir).resolve())},
                  "parent_run_id": parent},
        dataset_dir=str(dataset_dir), train_storage=f"{root}/train", inline=inline, use_gpu=gpu > 0,
        scaling=scaling, streams=prebuild_streams(sweep, str(dataset_dir), experiment if can_restore else None))
    logger.info("datasets of %d stream(s) built in the driver", len(plan.streams))
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, sweep=sweep, plan=plan), resources)
    tracker = TrialStates({t.trial_id: t.status for t in tune.ExperimentAnalysis(experiment).trials}
                          if can_restore else {})
    callbacks = [*(callbacks or []), tracker]
    if can_restore:
        logger.info("restoring the Tune experiment at %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        # The restored RunConfig holds the first run's (pickled) callbacks: use this run's.
        tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        scheduler = None
        if sweep.asha is not None:
            scheduler = ASHAScheduler(time_attr=sweep.asha.time_attr, metric=sweep.metric, mode=sweep.mode,
                                      max_t=sweep.asha.max_t, grace_period=sweep.asha.grace_period,
                                      reduction_factor=sweep.asha.reduction_factor, stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(sweep),
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler,
                                        # max_concurrent_trials is ignored next to a search_alg: limit it here.
                                        search_alg=BasicVariantGenerator(random_state=sweep.search_seed,
                                                                         max_concurrent=sweep.max_concurrent_trials),
                                        reuse_actors=True,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name="tune", storage_path=root, verbose=0, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    # num_to_keep makes Tune snapshot its state before dropping old checkpoints, every few epochs
    # here; that is intended, so its "excessive snapshots" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        grid = tuner.fit()
    except BaseException:
        _end_sweep_run(target, parent, "KILLED")
        raise
    states = {result.path.rsplit("/", 1)[-1]: tracker.states.get(result.path.rsplit("/", 1)[-1], "PENDING")
              for result in grid}
    if "ERROR" in states.values():
        status = "FAILED"
    elif set(states.values()) - {"TERMINATED"}:
        status = "KILLED"  # interrupted: Ctrl-C stops Tune, which saves its state and returns
    else:
        status = "FINISHED"
    _end_sweep_run(target, parent, status)
    return _summarise(sweep, grid, states, target, parent, root)


def _describe_asha(sweep: SweepConfig) -> str:
    if sweep.asha is None:
        return "none"
    a = sweep.asha
    return (f"asha(time_attr={a.time_attr}, max_t={a.max_t}, grace_period={a.grace_period}, "
            f"reduction_factor={a.reduction_factor:g})")


def _end_sweep_run(target: Any, parent: str, status: str) -> None:
    """End the parent run; trial runs left RUNNING (killed trials) and their stage runs become KILLED."""
    from medcl import tracking as mlt

    for run_id in mlt.end_parent_run(target, parent, status=status):
        mlt.close_open_children(target, run_id)

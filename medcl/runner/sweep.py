"""Hyperparameter sweeps: Ray Tune trials over a search space from ``tune_spaces/*.yaml``.

Each trial runs a whole method chain (stages in sequence, each starting from the
previous stage's final checkpoint) or one stage, inline in the trial for one
CPU worker (or a GPU fraction), or through a ``TorchTrainer`` for several
workers — with the pipelines' trial runner (:func:`medcl.runner.trial.run_trial`;
how a chain trial checkpoints and resumes: :mod:`medcl.runner.stage_tags`).
ASHA can stop single-stage trials early on a per-epoch metric (``train/loss``).

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

Example:
    >>> result = run_sweep(load_sweep("tune_spaces/quickstart_temperature.yaml"))  # doctest: +SKIP
    >>> result.best.values  # doctest: +SKIP
    {'stages.global.temperature': 0.2}
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcl.config.paths import get_path, unflatten
from medcl.config.pipeline import with_scaling
from medcl.config.space import Distribution, resolve_chain
from medcl.config.stages import StageConfig
from medcl.config.sweep import SweepConfig
from medcl.runner.plan import run_root
from medcl.runner.sweep_summary import SweepResult, TrialSummary, format_value, summarise, trial_values
from medcl.storage import read_json, write_json

if TYPE_CHECKING:
    from medcl.runner.failures import ParentRunGuard
    from medcl.runner.trial import TrialPlan

logger = logging.getLogger(__name__)

__all__ = ["SweepResult", "TrialSummary", "prebuild_streams", "run_sweep", "sweep_trial"]

_SIDECAR = "sweep.json"


# ------------------------------------------------------------------ the search space ----
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
        return " ".join(f"{key.rsplit('.', 1)[-1]}={format_value(get_path(config, key))}" for key in self.keys)


def _param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's nested param space from the dotted keys (``stages.local.temperature``), plus a ``trial`` label."""
    from ray import tune

    space = unflatten({key: _tune_domain(dist) for key, dist in sweep.space.items()})
    space["trial"] = tune.sample_from(_TrialLabel(tuple(sweep.space)))
    return space


# ------------------------------------------------------------------ the trial ----
def _trial_params(sweep: SweepConfig, stages: list[tuple[str, StageConfig]]) -> dict[str, Any]:
    from medcl.runner.trial import stage_params

    fractions = [cfg.label_fraction for _, cfg in stages if hasattr(cfg, "label_fraction")]
    return {
        "sweep": sweep.name,
        "method": sweep.method or "none",
        "stage": sweep.stage or "none",
        "chain": ">".join(name for name, _ in stages),
        "seed": stages[0][1].seed,
        "label_fraction": fractions[0] if fractions else "none",
        "dataset": str(sweep.pipeline.dataset.path),
        "stages": {name: stage_params(cfg) for name, cfg in stages},
    }


def sweep_trial(config: dict[str, Any], sweep: SweepConfig, plan: TrialPlan) -> None:
    """Ray Tune trainable of a sweep: resolve the sampled values, run the trial's stages in its MLflow run.

    Its name (``sweep_trial``) is stored in the sweep's Tune experiment: ``Tuner.restore`` needs the same.
    """
    from ray import tune

    from medcl.runner.trial import TrialRun, run_trial

    trial_id = tune.get_context().get_trial_id()
    stages = resolve_chain(sweep.pipeline, sweep.chain, trial_values(sweep, config), init_from=sweep.init_from)
    run = TrialRun(trial_id, params=_trial_params(sweep, stages),
                   tags={"medcl.role": "trial", "medcl.sweep": sweep.name, "medcl.swept": ",".join(sweep.space),
                         "medcl.dataset": str(sweep.pipeline.dataset.path)},
                   stage_run_tags={"medcl.role": "stage", "medcl.sweep": sweep.name})
    run_trial(plan, stages, run)


def prebuild_streams(sweep: SweepConfig, dataset_dir: str, experiment: str | None = None,
                     limit: int = 256) -> dict[Any, Any]:
    """The streams trials will read, built once in the driver before any trial holds a CPU.

    A new sweep covers every combination of the grid/choice values (continuous
    keys at the pipeline's values); a restored one only the stages its
    unfinished trials have left. A trial builds what is missing itself.

    Returns:
        ``StreamSpec -> materialised dataset`` (:func:`~medcl.runner.datasets.stage_streams`'s cache).
    """
    from medcl.runner.datasets import stage_streams
    from medcl.runner.stage_tags import read_tag

    todo: list[tuple[dict[str, Any], int]] = []  # (values, first stage to run)
    if experiment is not None:
        from ray import tune

        for trial in tune.ExperimentAnalysis(experiment).trials:
            if trial.status == "TERMINATED":
                continue
            tag = read_tag(trial.checkpoint) if trial.checkpoint is not None else None
            first = 0 if tag is None else tag["stage_index"] + (1 if tag["complete"] else 0)
            todo.append((trial_values(sweep, trial.config), first))
    else:
        discrete = {k: d.values for k, d in sweep.space.items() if d.kind in ("grid", "choice")}
        combos = list(itertools.islice(itertools.product(*discrete.values()), limit + 1))
        if len(combos) > limit:
            logger.info("more than %d value combinations: trials build their own datasets", limit)
            return {}
        todo = [(dict(zip(discrete, combo)), 0) for combo in combos]
    stages = []
    for n, (values, first) in enumerate(todo):
        chain = resolve_chain(sweep.pipeline, sweep.chain, values, init_from=sweep.init_from)
        stages.extend(((n, i), cfg) for i, (_, cfg) in enumerate(chain) if i >= first)
    cache: dict[Any, Any] = {}
    stage_streams(stages, dataset_dir, cache=cache)
    return cache


# ------------------------------------------------------------------ the sweep ----
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


def _describe_asha(sweep: SweepConfig) -> str:
    if sweep.asha is None:
        return "none"
    a = sweep.asha
    return (f"asha(time_attr={a.time_attr}, max_t={a.max_t}, grace_period={a.grace_period}, "
            f"reduction_factor={a.reduction_factor:g})")


def _parent_run(sweep: SweepConfig, target: Any, sidecar: dict[str, Any] | None, root: str, dataset_dir: Path) -> str:
    """The sweep's MLflow run: the one in ``sweep.json``, reopened, or a new one (then recorded there)."""
    from medcl import tracking as mlt

    if sidecar is not None:
        if sidecar["tracking_uri"] != target.tracking_uri:
            raise ValueError(f"sweep {sweep.name!r} logs to MLflow at {sidecar['tracking_uri']}, not "
                             f"{target.tracking_uri}; resume it with the same tracking settings")
        parent = sidecar["parent_run_id"]
        mlt.reopen_run(target, parent)
        logger.info("resuming sweep %s (MLflow run %s)", sweep.name, parent)
        return parent
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
    return parent


def _end_sweep_run(target: Any, parent: str, status: str) -> None:
    """End the parent run; trial runs left RUNNING (killed trials) and their stage runs become KILLED."""
    from medcl import tracking as mlt

    for run_id in mlt.end_parent_run(target, parent, status=status):
        mlt.close_open_children(target, run_id)


def run_sweep(sweep: SweepConfig, *, resume: bool = False, callbacks: list | None = None,
              num_workers: int | None = None, use_gpu: bool | None = None) -> SweepResult:
    """Run (or, with ``resume``, continue) a sweep on the current Ray instance.

    Args:
        sweep: From :func:`~medcl.config.sweep.load_sweep`.
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
        RunLockedError: A sweep of this name is running (:func:`~medcl.runner.lock.run_lock`).

    A sweep that raises ends its MLflow run FAILED (KILLED when interrupted).
    """
    from medcl.runner.failures import ParentRunGuard
    from medcl.runner.lock import run_lock

    with run_lock(run_root(sweep.storage_path, sweep.name), f"sweep {sweep.name!r}"), ParentRunGuard() as guard:
        return _run_sweep(sweep, resume=resume, callbacks=callbacks, num_workers=num_workers, use_gpu=use_gpu,
                          guard=guard)


def _run_sweep(sweep: SweepConfig, *, resume: bool, callbacks: list | None, num_workers: int | None,
               use_gpu: bool | None, guard: ParentRunGuard) -> SweepResult:
    """:func:`run_sweep` under the sweep's lock; ``guard`` ends the sweep's MLflow run when this raises."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from medcl import tracking as mlt
    from medcl.runner.datasets import prepare_dataset
    from medcl.runner.ray_shims import forget_pending_decisions
    from medcl.runner.trial import TrialPlan
    from medcl.runner.tuner import TrialStates, open_tuner, trial_placement

    root = run_root(sweep.storage_path, sweep.name)
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
    parent = _parent_run(sweep, target, sidecar, root, dataset_dir)
    guard.watch(lambda status: _end_sweep_run(target, parent, status))

    if can_restore:
        forget_pending_decisions(experiment)
    gpu = sweep.resources.gpu or (1.0 if pipeline.scaling.use_gpu else 0.0)
    if gpu and not ray.cluster_resources().get("GPU"):
        logger.warning("trials ask for %g GPU but the Ray cluster has none (yet): they wait until one joins", gpu)
    placement = trial_placement(pipeline.scaling, cpu=sweep.resources.cpu, gpu=gpu, fractional_gpu=True)
    plan = TrialPlan(
        tracking={"target": {"tracking_uri": target.tracking_uri, "experiment": sweep.tracking.experiment,
                             "workdir": str(Path(sweep.tracking.workdir).resolve())},
                  "parent_run_id": parent},
        dataset_dir=str(dataset_dir), train_storage=f"{root}/train", train_name="{trial_id}-{index}-{stage}",
        placement=placement, streams=prebuild_streams(sweep, str(dataset_dir), experiment if can_restore else None),
        stage_tags=True)
    logger.info("datasets of %d stream(s) built in the driver", len(plan.streams))
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, sweep=sweep, plan=plan), placement.resources)
    tracker = TrialStates({t.trial_id: t.status for t in tune.ExperimentAnalysis(experiment).trials}
                          if can_restore else {})
    callbacks = [*(callbacks or []), tracker]
    if can_restore:
        logger.info("restoring the Tune experiment at %s", experiment)
    scheduler = None
    if sweep.asha is not None:
        scheduler = ASHAScheduler(time_attr=sweep.asha.time_attr, metric=sweep.metric, mode=sweep.mode,
                                  max_t=sweep.asha.max_t, grace_period=sweep.asha.grace_period,
                                  reduction_factor=sweep.asha.reduction_factor, stop_last_trials=False)
    tuner = open_tuner(trainable, root, "tune", param_space=_param_space(sweep), callbacks=callbacks,
                       # max_concurrent_trials is ignored next to a search_alg: limit it here.
                       tune_options={"num_samples": sweep.num_samples, "scheduler": scheduler,
                                     "search_alg": BasicVariantGenerator(random_state=sweep.search_seed,
                                                                         max_concurrent=sweep.max_concurrent_trials)},
                       max_failures=sweep.max_failures, keep_checkpoints=2)
    grid = tuner.fit()
    states = {result.path.rsplit("/", 1)[-1]: tracker.states.get(result.path.rsplit("/", 1)[-1], "PENDING")
              for result in grid}
    if "ERROR" in states.values():
        status = "FAILED"
    elif set(states.values()) - {"TERMINATED"}:
        status = "KILLED"  # interrupted: Ctrl-C stops Tune, which saves its state and returns
    else:
        status = "FINISHED"
    _end_sweep_run(target, parent, status)
    return summarise(sweep, grid, states, target, parent, root)

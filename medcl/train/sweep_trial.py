"""One sweep trial: a chain of stages (or one stage) run inside a Ray Tune trial, resumable stage by stage.

Every Tune checkpoint of a chain trial carries a tag file (``medcl_stage.json``:
stage index and name, epoch, whether the stage is complete, its last metrics).
A trial that is restored (``--resume``, or a retry after a failure) reads the
tag of its latest checkpoint: stages before the tagged one are complete and
skipped; a complete tagged stage hands its checkpoint to the next stage as
``init_from``; an incomplete one resumes from that checkpoint (which holds all
of the stage's weights, so it needs no ``init_from``). Inside a stage the loop
only accepts checkpoints of its own stage index (:class:`ChainStageContext`),
so a stage never mistakes the previous stage's final checkpoint — which
``tune.get_checkpoint()`` returns once it is reported — for its own.

One CPU worker (or a GPU fraction): each stage runs inline in the trial. More
workers: each stage runs on a ``TorchTrainer`` (one Train run per trial and
stage, which resumes itself) and the trial then reports a small tag-only
checkpoint that points at the stage's final Train checkpoint.

MLflow: the trial's run (named after the trial id, found again after a restore)
gets all resolved parameters and the final metrics; a chain of several stages
also gets one run per stage under the trial's run (per-epoch metrics), and the
trial's run each stage's final metrics as ``<stage>/<metric>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ray.tune import Callback

from medcl.config import ScalingSpec, StageConfig, to_dict
from medcl.sweep_config import SweepConfig, resolve_chain
from medcl.train.context import TuneTrialContext

logger = logging.getLogger(__name__)

__all__ = ["STAGE_TAG_FILE", "ChainStageContext", "TrialPlan", "TrialStates", "read_tag", "trial_values",
           "prebuild_streams", "sweep_trial"]

STAGE_TAG_FILE = "medcl_stage.json"


# ------------------------------------------------------------------ stage tags ----
def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _write_tag(directory: str | Path, tag: dict[str, Any]) -> None:
    path = Path(directory) / STAGE_TAG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(tag, sort_keys=True))
    os.replace(tmp, path)


def read_tag(checkpoint: Any) -> dict[str, Any] | None:
    """The stage tag of a ``tune.Checkpoint`` (read through its filesystem, no download), or None."""
    try:
        with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{STAGE_TAG_FILE}") as fh:
            return json.loads(fh.readall().decode())
    except (FileNotFoundError, OSError):
        return None


class ChainStageContext(TuneTrialContext):
    """``TuneTrialContext`` for stage ``stage_index`` of a chain: tags its checkpoints, accepts only its own."""

    def __init__(self, datasets: dict[str, Any], *, stage_index: int, stage: str, max_epochs: int,
                 use_gpu: bool = False) -> None:
        super().__init__(datasets, use_gpu=use_gpu)
        self.stage_index = stage_index
        self.stage = stage
        self.max_epochs = max_epochs

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        metrics = {**metrics, "stage_index": self.stage_index}
        if checkpoint_dir is not None:
            epoch = int(metrics["epoch"])
            _write_tag(checkpoint_dir, {"stage_index": self.stage_index, "stage": self.stage, "epoch": epoch,
                                        "complete": epoch + 1 >= self.max_epochs, "model_dir": None,
                                        "metrics": _numeric(metrics)})
        super().report(metrics, checkpoint_dir)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        tag = read_tag(checkpoint) if checkpoint is not None else None
        if tag is None or tag["stage_index"] != self.stage_index:
            yield None
            return
        with super().latest_checkpoint() as path:
            yield path


@contextlib.contextmanager
def _local_dir(source: Any) -> Iterator[Path | None]:
    """A local directory for a hand-over: None, a path (Train checkpoint) or a ``tune.Checkpoint``."""
    if source is None or isinstance(source, (str, Path)):
        yield Path(source) if source is not None else None
        return
    with source.as_directory() as path:
        yield Path(path)


# ------------------------------------------------------------------ the trial ----
@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs besides its sampled values (shipped with ``tune.with_parameters``)."""

    tracking: dict[str, Any]
    dataset_dir: str
    train_storage: str
    inline: bool
    use_gpu: bool
    scaling: ScalingSpec
    streams: dict[Any, Any]  # StreamSpec -> materialised dataset, built by the driver


def trial_values(sweep: SweepConfig, config: dict[str, Any]) -> dict[str, Any]:
    """Dotted key -> value of this trial, from Tune's nested config."""
    values = {}
    for key in sweep.space:
        node: Any = config
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


def _stage_params(cfg: StageConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg).items() if k != "init_from"}


def _trial_params(sweep: SweepConfig, stages: list[tuple[str, StageConfig]]) -> dict[str, Any]:
    fractions = [cfg.label_fraction for _, cfg in stages if hasattr(cfg, "label_fraction")]
    return {
        "sweep": sweep.name,
        "method": sweep.method or "none",
        "stage": sweep.stage or "none",
        "chain": ">".join(name for name, _ in stages),
        "seed": stages[0][1].seed,
        "label_fraction": fractions[0] if fractions else "none",
        "dataset": str(sweep.pipeline.dataset.path),
        "stages": {name: _stage_params(cfg) for name, cfg in stages},
    }


def _build_streams(stages: list[tuple[int, StageConfig]], dataset_dir: str,
                   prebuilt: dict[Any, Any]) -> dict[int, dict[str, Any]]:
    """Every remaining stage's datasets: prebuilt by the driver, else built here (overlapping, each once)."""
    from medcl.data.ray_datasets import build_streams
    from medcl.train.driver import STAGES

    specs = {i: STAGES[cfg.kind].datasets(cfg, dataset_dir) for i, cfg in stages}
    flat = {f"{i}\0{name}": spec for i, named in specs.items() for name, spec in named.items()}
    built = build_streams(flat, cache=dict(prebuilt))
    return {i: {name: built[f"{i}\0{name}"] for name in named} for i, named in specs.items()}


def prebuild_streams(sweep: SweepConfig, dataset_dir: str, experiment: str | None = None,
                      limit: int = 256) -> dict[Any, Any]:
    """The streams trials will read, built once in the driver before any trial holds a CPU.

    Inside trials, dataset builds compete with the trials for CPUs (minutes on
    a small machine, seconds here). A new sweep covers every combination of the
    grid/choice values (continuous keys at the pipeline's values); a restored
    one only the stages its unfinished trials have left. A trial builds what is
    missing itself.
    """
    from medcl.data.ray_datasets import build_streams
    from medcl.train.driver import STAGES

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
    specs = set()
    for values, first in todo:
        stages = resolve_chain(sweep.pipeline, sweep.chain, values, init_from=sweep.init_from)
        for _, cfg in stages[first:]:
            specs.update(STAGES[cfg.kind].datasets(cfg, dataset_dir).values())
    cache: dict[Any, Any] = {}
    build_streams({str(i): spec for i, spec in enumerate(sorted(specs, key=repr))}, cache=cache)
    return cache


def _log_new_metrics(target: Any, run_id: str, metrics: dict[str, float]) -> None:
    """Log the metrics ``run_id`` does not have yet (a restored trial must not log a stage twice)."""
    from medcl.tracking import RunLogger

    existing = target.client().get_run(run_id).data.metrics
    new = {k: v for k, v in metrics.items() if k not in existing}
    if new:
        RunLogger(target, run_id).log_metrics(new)


def _run_stage(index: int, name: str, cfg: StageConfig, streams: dict[str, Any], plan: TrialPlan,
               run_tracking: dict[str, str], train_name: str) -> tuple[dict[str, float], Any]:
    """Run one stage of the trial; returns its final metrics and its hand-over checkpoint."""
    from ray import tune

    if plan.inline:
        from medcl.train.driver import STAGES, stage_inputs

        inputs = stage_inputs(cfg, plan.dataset_dir, streams, 1, amp=plan.use_gpu, tracking=run_tracking)
        ctx = ChainStageContext(streams, stage_index=index, stage=name, max_epochs=cfg.max_epochs,
                                 use_gpu=plan.use_gpu)
        metrics = STAGES[cfg.kind].run(ctx, cfg, inputs)
        handover = tune.get_checkpoint()  # the last report of the loop: this stage's final checkpoint
        tag = read_tag(handover) if handover is not None else None
        if tag is None or tag["stage_index"] != index or not tag["complete"]:
            raise RuntimeError(f"stage {index} ({name}) ended without its final checkpoint (latest tag: {tag})")
        return metrics or tag["metrics"], handover
    from ray.tune.integration.ray_train import TuneReportCallback

    from medcl.train.driver import run_stage

    result = run_stage(cfg, plan.dataset_dir, scaling=plan.scaling, storage_path=plan.train_storage,
                       name=train_name, tracking=run_tracking, callbacks=[TuneReportCallback()], streams=streams)
    metrics = _numeric(result.metrics)
    with tempfile.TemporaryDirectory(prefix="medcl-stage-") as tmp:
        _write_tag(tmp, {"stage_index": index, "stage": name, "epoch": cfg.max_epochs - 1, "complete": True,
                         "model_dir": result.checkpoint, "metrics": metrics})
        tune.report({**metrics, "stage_index": index}, checkpoint=tune.Checkpoint.from_directory(tmp))
    return metrics, result.checkpoint


def _run_chain(sweep: SweepConfig, stages: list[tuple[str, StageConfig]], plan: TrialPlan, target: Any,
               trial_run: str, trial_id: str) -> dict[str, float]:
    """Run the trial's stages in order, skipping those its latest checkpoint shows complete."""
    from ray import tune

    from medcl import tracking as mlt

    nested = len(stages) > 1
    first, handover, final = 0, None, {}
    latest = tune.get_checkpoint()
    tag = read_tag(latest) if latest is not None else None
    if tag is not None:
        if tag["complete"]:
            first, final = tag["stage_index"] + 1, tag["metrics"]
            handover = tag["model_dir"] or latest
            if nested:  # done when the stage ended, unless the trial died just after its last report
                _close_completed_stage(target, trial_run, f"{trial_id}/{tag['stage_index']}-{tag['stage']}", final)
                _log_new_metrics(target, trial_run, {f"{tag['stage']}/{k}": v for k, v in final.items()})
        else:
            first = tag["stage_index"]  # resumes from its own checkpoint, which holds all its weights
        logger.info("trial %s: resuming at stage %d of %d", trial_id, first, len(stages))
    streams = _build_streams([(i, cfg) for i, (_, cfg) in enumerate(stages) if i >= first], plan.dataset_dir,
                             plan.streams)
    for index in range(first, len(stages)):
        name, cfg = stages[index]
        run_id = trial_run
        if nested:
            run_id = mlt.child_run_id(target, trial_run, f"{trial_id}/{index}-{name}",
                                      params={"stage": name, "kind": cfg.kind, "stage_index": index,
                                              "config": _stage_params(cfg)},
                                      tags={"medcl.role": "stage", "medcl.sweep": sweep.name})
        try:
            with _local_dir(handover) as init_dir:
                if init_dir is not None:
                    cfg = dataclasses.replace(cfg, init_from=init_dir)
                    mlt.RunLogger(target, run_id).set_tags({"medcl.init_from": str(init_dir)})
                run_tracking = {"tracking_uri": target.tracking_uri, "run_id": run_id}
                final, handover = _run_stage(index, name, cfg, streams[index], plan, run_tracking,
                                             train_name=f"{trial_id}-{index}-{name}")
        except (KeyboardInterrupt, SystemExit):
            if nested:
                mlt.finish_run(target, run_id, status="KILLED")
            raise
        except BaseException:
            if nested:
                mlt.finish_run(target, run_id, status="FAILED")
            raise
        if nested:
            mlt.finish_run(target, run_id, metrics=final, status="FINISHED")
            _log_new_metrics(target, trial_run, {f"{name}/{k}": v for k, v in _numeric(final).items()})
    return final


def _close_completed_stage(target: Any, trial_run: str, name: str, metrics: dict[str, float]) -> None:
    """Finish the MLflow run of a stage whose final checkpoint exists but whose run was left open or KILLED."""
    from medcl import tracking as mlt

    runs = mlt.search_runs(target, parent_run_id=trial_run, filter=f"attributes.run_name = '{name}'")
    for run_id, status in zip(runs.get("run_id", []), runs.get("status", [])):
        if status != "FINISHED":
            mlt.finish_run(target, run_id, metrics=metrics, status="FINISHED")


def sweep_trial(config: dict[str, Any], sweep: SweepConfig, plan: TrialPlan) -> None:
    """Ray Tune trial: resolve the sampled values, open the trial's MLflow run, run its stages."""
    from ray import tune

    from medcl import tracking as mlt

    trial_id = tune.get_context().get_trial_id()
    stages = resolve_chain(sweep.pipeline, sweep.chain, trial_values(sweep, config), init_from=sweep.init_from)
    target = mlt.configure_tracking(**plan.tracking["target"])
    run_id = mlt.child_run_id(target, plan.tracking["parent_run_id"], trial_id,
                              params=_trial_params(sweep, stages),
                              tags={"medcl.role": "trial", "medcl.sweep": sweep.name,
                                    "medcl.swept": ",".join(sweep.space),
                                    "medcl.dataset": str(sweep.pipeline.dataset.path)})
    try:
        final = _run_chain(sweep, stages, plan, target, run_id, trial_id)
    except (KeyboardInterrupt, SystemExit):  # stopped by the scheduler (ASHA) or interrupted
        mlt.finish_run(target, run_id, status="KILLED")
        raise
    except BaseException:
        mlt.finish_run(target, run_id, status="FAILED")
        raise
    mlt.finish_run(target, run_id, metrics=final, status="FINISHED")


class TrialStates(Callback):
    """Tune callback (in the driver) keeping each trial's state: TERMINATED, ERROR, or RUNNING if interrupted.

    Args:
        before: States saved by an earlier run of a restored sweep; its finished trials are not
            touched again. (A trial that failed may be saved as RUNNING; it runs again and reports anew.)
    """

    def __init__(self, before: dict[str, str]) -> None:
        self.states = dict(before)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.states[trial.trial_id] = "RUNNING"

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.states[trial.trial_id] = "TERMINATED"

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.states[trial.trial_id] = "ERROR"

"""The Tune side of pipelines and sweeps: where a trial runs, what it reserves, and the (restored) ``Tuner``.

A pipeline wave (``<storage_path>/<name>/wave<depth>``) and a sweep
(``<storage_path>/<name>/tune``) are each one Tune experiment, started by
:func:`open_tuner` or, when it exists, restored with
``Tuner.restore(..., resume_errored=True)``: finished trials are not run again,
unfinished and errored ones continue from their latest checkpoints. An
experiment whose ``tuner.pkl`` is empty or unreadable (a crash while it was
being written) starts afresh when none of its trials ran, and is refused with
the directory to delete when some did.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from medcl.config.stages import ScalingSpec
from medcl.runner.ray_shims import use_callbacks_after_restore, use_scheduler

logger = logging.getLogger(__name__)

__all__ = ["TrialPlacement", "TrialStates", "open_tuner", "trial_dirname", "trial_placement"]


@dataclass(frozen=True)
class TrialPlacement:
    """Where a trial's stages run and what the trial reserves.

    Attributes:
        inline: Run each stage in the trial's own process (one worker); else on a ``TorchTrainer``.
        use_gpu: The stages use a GPU (the trial's, or one per Train worker).
        scaling: The ``TorchTrainer``'s workers when not ``inline``.
        resources: The trial's own Tune resources.
    """

    inline: bool
    use_gpu: bool
    scaling: ScalingSpec
    resources: dict[str, float]


def trial_placement(scaling: ScalingSpec, *, cpu: float, gpu: float, fractional_gpu: bool) -> TrialPlacement:
    """Where the trials of a pipeline or sweep run, and what each reserves.

    One worker runs inline in the trial, which then holds ``cpu`` (and ``gpu``);
    more workers (or a GPU without ``fractional_gpu``) run on a ``TorchTrainer``
    whose workers hold ``cpu`` and a whole GPU each, and the trial, which only
    drives the trainer, almost nothing.

    Args:
        scaling: Workers per stage (``num_workers``, ``max_failures``).
        cpu: CPUs per trial (inline) or per Train worker.
        gpu: GPUs per trial (inline; a fraction lets trials share one) or, when > 0, one per Train worker.
        fractional_gpu: Whether a one-worker GPU stage may run inline on a share of a GPU (sweeps);
            pipelines run GPU stages on a ``TorchTrainer``.
    """
    inline = scaling.num_workers == 1 and (fractional_gpu or not gpu)
    resources = {"CPU": cpu, **({"GPU": gpu} if gpu else {})} if inline else {"CPU": 0.01}
    return TrialPlacement(inline=inline, use_gpu=gpu > 0, resources=resources,
                          scaling=dataclasses.replace(scaling, cpus_per_worker=cpu, use_gpu=gpu > 0))


_UNSAFE = re.compile(r"[^A-Za-z0-9@=,._-]")


def trial_dirname(trial: Any) -> str:
    """A trial's directory name: its pipeline job key, or its trial id for a sweep's trial.

    ``global>finetune@seed=0,fraction=0.01`` becomes ``global+finetune@seed=0,fraction=0.01``. A key
    with other characters outside ``[A-Za-z0-9@=,._-]`` (or a ``+`` of its own) is made safe with
    ``_`` and suffixed with the trial id, so names stay unique (job keys are unique within a wave).
    """
    job = (getattr(trial, "config", None) or {}).get("job")
    if not isinstance(job, str) or not job:
        return trial.trial_id
    stages = job.split(">")
    if any(_UNSAFE.search(part) for part in stages) or len(job) > 200:
        return "+".join(_UNSAFE.sub("_", part) for part in stages)[:200] + "-" + trial.trial_id
    return "+".join(stages)


def open_tuner(trainable: Any, storage: str, name: str, *, param_space: dict[str, Any], tune_options: dict[str, Any],
               callbacks: list, max_failures: int, keep_checkpoints: int | None = None,
               restore_callbacks: bool = True, scheduler: Any = None) -> Any:
    """Restore the Tune experiment ``<storage>/<name>`` when it exists, else start it.

    A pipeline's trial directories are named by job key (:func:`trial_dirname`), a sweep's by trial id;
    Tune reuses actors and stays quiet.

    Args:
        trainable: The (``with_parameters``/``with_resources`` wrapped) function trainable; a restore
            needs one of the same name as the experiment's.
        storage: The run's directory or URI (``<storage_path>/<name of the pipeline or sweep>``).
        name: The experiment (``wave0``, ``tune``).
        param_space: Tune's (nested) search space of a new experiment.
        tune_options: Further ``tune.TuneConfig`` keywords of a new experiment (scheduler, concurrency).
        callbacks: Tune callbacks of a new experiment, and of a restored one with ``restore_callbacks``
            (copied: Tune appends its own logger callbacks, whose open files cannot be pickled, to the list).
        max_failures: Retries of a failed trial.
        keep_checkpoints: Tune checkpoints kept per trial (None: all).
        restore_callbacks: Give a restored experiment ``callbacks`` (else it keeps those of its first
            start, which Tune pickled with it).
        scheduler: Run a new or restored experiment with this trial scheduler (not stored in ``tuner.pkl``);
            None keeps the one of ``tune_options`` (or of the experiment's first start).

    Raises:
        ValueError: The experiment's ``tuner.pkl`` is unreadable but some of its trials ran.
    """
    from ray import tune

    experiment = f"{storage}/{name}"
    if keep_checkpoints is not None:
        # num_to_keep makes Tune snapshot its state before dropping old checkpoints, every few epochs
        # here; that is intended, so its "excessive snapshots" warning is noise.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tuner = _restore(experiment, trainable) if tune.Tuner.can_restore(experiment) else None
    if tuner is not None:
        if restore_callbacks:
            use_callbacks_after_restore(tuner, list(callbacks))
        if scheduler is not None:
            use_scheduler(tuner, scheduler)
        return tuner
    checkpoint_config = tune.CheckpointConfig(num_to_keep=keep_checkpoints) if keep_checkpoints is not None else None
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True, trial_dirname_creator=trial_dirname,
                                    **tune_options),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=list(callbacks),
                                  failure_config=tune.FailureConfig(max_failures=max_failures),
                                  checkpoint_config=checkpoint_config),
    )
    if scheduler is not None:
        use_scheduler(tuner, scheduler)
    return tuner


def _restore(experiment: str, trainable: Any) -> Any:
    """``Tuner.restore(experiment)``, or None when its ``tuner.pkl`` is unreadable and none of its trials ran.

    Tune writes ``tuner.pkl`` when a ``Tuner`` is created, before any trial, through an
    output stream opened first: an error while pickling (or a kill) leaves it empty.

    Raises:
        ValueError: ``tuner.pkl`` is unreadable and the experiment has trial state.
    """
    from ray import tune

    try:
        return tune.Tuner.restore(experiment, trainable, resume_errored=True)
    except (EOFError, pickle.UnpicklingError) as exc:
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if any(name.startswith("experiment_state-") for name in _file_names(experiment)):
            raise ValueError(f"the Ray Tune state {experiment}/tuner.pkl is unreadable ({problem}) although trials "
                             f"of it ran; delete {experiment} to run its trials again from the start") from exc
        logger.warning("the Ray Tune state %s/tuner.pkl is unreadable (%s) and no trial of it ran (left by a crash "
                       "while it was being created): starting it afresh", experiment, problem)
        return None


def _file_names(directory: str) -> list[str]:
    """Base names of the files in a local directory or under a URI."""
    import pyarrow.fs

    fs, base = (pyarrow.fs.FileSystem.from_uri(directory) if "://" in directory
                else (pyarrow.fs.LocalFileSystem(), directory))
    return [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))]


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

"""Ctrl-C during a pipeline wave: stop every running job at its next checkpoint, then end the run as interrupted.

Ray Tune handles SIGINT itself: it stops at once, saves its state and
``Tuner.fit()`` returns normally. A trial is then often one epoch ahead of the
state Tune saved (it trained, logged and checkpointed an epoch whose result the
driver never processed), so a resume runs that epoch again and logs it twice.
Inside :func:`stop_at_next_checkpoint` a wave handles SIGINT instead:

1. First Ctrl-C: no trial starts any more; each running trial is *parked* at
   its next report that carries a checkpoint (the scheduler answers ``NOOP``, so
   the trial waits inside ``report`` with everything it logged saved and
   registered), a trial at its last epoch finishes; once nothing runs unparked
   the Tune run is stopped (:func:`~medcl.runner.ray_shims.interrupt_tune_run`).
2. Second Ctrl-C: Tune's own immediate stop (the epoch in flight runs again on resume).
3. Third Ctrl-C: ``KeyboardInterrupt`` at once.

The wave then raises :class:`RunInterrupted` (a ``KeyboardInterrupt``: exit
status 130); starting the same pipeline again finishes the parked jobs from
their latest checkpoints.

Example:
    >>> with stop_at_next_checkpoint() as drain:  # doctest: +SKIP
    ...     use_scheduler(tuner, drain.scheduler); tuner.fit()
    >>> drain.requested  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Iterator

from ray.tune import Callback
from ray.tune.result import SHOULD_CHECKPOINT
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from medcl.runner.ray_shims import interrupt_tune_run

logger = logging.getLogger(__name__)

__all__ = ["Drain", "RunInterrupted", "stop_at_next_checkpoint"]

_TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


class RunInterrupted(KeyboardInterrupt):
    """A run stopped (Ctrl-C, SIGINT) before all its jobs finished; the same command resumes it. Exit status 130."""


class Drain:
    """What a Ctrl-C asks of one running Tune experiment, and how far it got.

    Attributes:
        requested: A first Ctrl-C came: start nothing, park running trials at their next checkpoint.
        forced: A second Ctrl-C came: Tune's immediate stop was asked for.
        stopping: The Tune run was asked to stop (once).
        parked: Trial ids waiting inside ``report`` after a checkpoint Tune registered.
        saving: Trial ids waiting inside ``report`` whose checkpoint Tune is still saving.
        scheduler: The wave's scheduler (FIFO until ``requested``).
        callback: The Tune callback that notices parked trials and stops the run when nothing else runs.
    """

    def __init__(self) -> None:
        self.requested = False
        self.forced = False
        self.stopping = False
        self.parked: set[str] = set()
        self.saving: set[str] = set()
        self.scheduler = _DrainScheduler(self)
        self.callback = _DrainCallback(self)

    def on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT handler (see the module docstring for the three presses)."""
        if not self.requested:
            self.requested = True
            logger.warning("interrupted: stopping each running job at its next checkpoint (Ctrl-C again to stop "
                           "now; the epoch in flight then runs again on resume)")
        elif not self.forced:
            self.forced = self.stopping = True
            logger.warning("interrupted again: stopping now")
            interrupt_tune_run()
        else:
            raise KeyboardInterrupt

    def park(self, trial_id: str, will_save: bool) -> None:
        """The scheduler held ``trial_id`` back; it is parked once Tune saved the checkpoint it reported, if any."""
        (self.saving if will_save else self.parked).add(trial_id)

    def saved(self, trial_id: str) -> None:
        """Tune registered the latest checkpoint of ``trial_id``."""
        if trial_id in self.saving:
            self.saving.discard(trial_id)
            self.parked.add(trial_id)

    def maybe_stop(self, trials: list) -> None:
        """Stop the Tune run once no trial is running unparked."""
        if not self.requested or self.stopping:
            return
        if all(trial.trial_id in self.parked for trial in trials if trial.status == "RUNNING"):
            self.stopping = True
            logger.info("every running job is parked at a checkpoint; stopping")
            interrupt_tune_run()


class _DrainScheduler(FIFOScheduler):
    """FIFO, except that after a Ctrl-C no trial starts and running ones park at their next checkpoint.

    A result at the stage's last epoch (``epoch + 1 == max_epochs``) continues, so the job finishes;
    a result without a Tune checkpoint parks only when it comes from a ``TorchTrainer`` (metric
    ``checkpoint_path``: that Train run resumes from its own checkpoints).
    """

    def __init__(self, drain: Drain) -> None:
        super().__init__()
        self._drain = drain

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self._drain.requested:
            return TrialScheduler.CONTINUE
        epoch, max_epochs = result.get("epoch"), result.get("max_epochs")
        if epoch is not None and max_epochs and int(epoch) + 1 >= int(max_epochs):
            return TrialScheduler.CONTINUE
        if result.get(SHOULD_CHECKPOINT):
            self._drain.park(trial.trial_id, will_save=True)
            return TrialScheduler.NOOP
        if "checkpoint_path" in result:
            self._drain.park(trial.trial_id, will_save=False)
            return TrialScheduler.NOOP
        return TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        return None if self._drain.requested else super().choose_trial_to_run(tune_controller)


class _DrainCallback(Callback):
    def __init__(self, drain: Drain) -> None:
        self._drain = drain

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._drain.saved(trial.trial_id)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._drain.maybe_stop(trials)


@contextlib.contextmanager
def stop_at_next_checkpoint() -> Iterator[Drain]:
    """Handle SIGINT with a :class:`Drain` (instead of Tune) while the block runs ``Tuner.fit()``.

    Outside the main thread (where signal handlers cannot be set) Tune's own handling stays.

    Yields:
        The :class:`Drain`: give ``drain.scheduler`` and ``drain.callback`` to the Tuner.
    """
    drain = Drain()
    if threading.current_thread() is not threading.main_thread():
        yield drain
        return
    previous_env = os.environ.get(_TUNE_SIGINT)
    previous_handler = signal.signal(signal.SIGINT, drain.on_sigint)
    os.environ[_TUNE_SIGINT] = "1"
    try:
        yield drain
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if previous_env is None:
            os.environ.pop(_TUNE_SIGINT, None)
        else:
            os.environ[_TUNE_SIGINT] = previous_env

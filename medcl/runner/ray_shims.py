"""Every workaround that touches Ray's internals, in one place (checked against Ray 2.60.0).

Each function names the private structure it relies on; when Ray is upgraded,
re-check them here (``tests/runner/test_ray_shims.py`` and the sweep resume test
exercise both) and delete what Ray fixed.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["forget_pending_decisions", "interrupt_tune_run", "use_callbacks_after_restore", "use_scheduler"]


def forget_pending_decisions(experiment: str) -> None:
    """Drop scheduling decisions that were waiting on a checkpoint save when the experiment state was written.

    Ray Tune (2.60) saves these with the experiment state (``experiment_state-*.json``,
    ``runner_data._cached_trial_decisions`` / ``_queued_trial_decisions``) and applies them
    after a restore: a trial that died while its checkpoint was being saved left a STOP
    that would end it, unfinished and not resumable, at its first checkpoint after
    ``--resume``. A restored experiment has no save in flight, so none applies.

    Args:
        experiment: The Tune experiment directory (a path or a URI).
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


def use_callbacks_after_restore(tuner: Any, callbacks: list) -> None:
    """Make a restored ``tune.Tuner`` call ``callbacks`` instead of the ones of its first start.

    ``Tuner.restore`` (2.60) takes no ``run_config``: the restored ``RunConfig`` holds the
    first run's (pickled) callbacks. Their list is replaced on the private
    ``Tuner._local_tuner`` (a ``TunerInternal``), whose ``get_run_config()`` returns the
    ``RunConfig`` that ``fit()`` uses.
    """
    tuner._local_tuner.get_run_config().callbacks = callbacks


def use_scheduler(tuner: Any, scheduler: Any) -> None:
    """Make a new or restored ``tune.Tuner`` run with ``scheduler`` instead of the one in its ``TuneConfig``.

    ``Tuner.restore`` (2.60) takes no ``tune_config``: the restored one, with its
    scheduler, comes from ``tuner.pkl``. The scheduler is replaced on the private
    ``Tuner._local_tuner._tune_config`` (read by ``fit()``); ``tuner.pkl`` keeps the
    one the Tuner was created with (Tune's FIFO by default), so it never refers to a
    medcl class.
    """
    tuner._local_tuner._tune_config.scheduler = scheduler


def interrupt_tune_run() -> None:
    """Stop the ``Tuner.fit()`` running in this process's main thread as a Ctrl-C would.

    Tune (2.60, ``tune.py: _setup_signal_catching``) always handles SIGUSR1 like its
    SIGINT: it stops the trials, saves the experiment state and returns normally.

    Raises:
        KeyboardInterrupt: No handler for SIGUSR1 is set (Tune is not running here yet).
    """
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGUSR1)

"""How a run fails: a deterministic failure is not retried, the MLflow parent run is never left RUNNING, one message.

Ray retries every failure of a trial (Tune's ``FailureConfig.max_failures``; Ray
2.60 has no error class it leaves alone, ``Trial.should_recover``), and Ray
Train every worker error. A loss that became NaN or infinite
(:class:`~medcl.train.loop.NonFiniteLossError`) comes back on every retry, so
a pipeline job's trial does not raise it: :func:`no_retry` ends the trial with
a last report that names the error (the job's MLflow run has ended FAILED by
then), and :func:`raise_terminal_errors` fails the wave with it. On a
``TorchTrainer`` the workers return it instead of raising
(:func:`medcl.train.driver.run_stage`).

:class:`ParentRunGuard` ends a pipeline's or sweep's MLflow parent run FAILED
when the run raises (KILLED on an interruption). :func:`describe_error` is the
one message ``medcl`` prints for a runtime failure.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import sys
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

__all__ = ["TERMINAL_ERROR", "ParentRunGuard", "describe_error", "no_retry", "raise_terminal_errors",
           "terminal_error"]

TERMINAL_ERROR = "medcl_terminal_error"


@contextlib.contextmanager
def no_retry(label: str) -> Iterator[None]:
    """Inside a Tune function trainable: end a deterministic failure with a last report instead of raising it.

    The trial then ends TERMINATED (Tune retries only errors) with ``{TERMINAL_ERROR: "<label>: <error>"}``
    as its last result; :func:`terminal_error` reads it back.
    """
    from medcl.train.loop import NonFiniteLossError  # torch: imported where a trial runs anyway

    try:
        yield
    except NonFiniteLossError as exc:
        from ray import tune

        logger.error("%s: %s", label, exc)
        tune.report({TERMINAL_ERROR: f"{label}: {exc}"})


def terminal_error(result: Any) -> str | None:
    """The deterministic failure a trial ended with (its last result, see :func:`no_retry`), or None."""
    return (result.metrics or {}).get(TERMINAL_ERROR)


def raise_terminal_errors(depth: int, results: dict[str, Any]) -> None:
    """Fail wave ``depth`` when any of its trials (job key -> Tune result) ended with a deterministic failure.

    Raises:
        RuntimeError: Naming each such job and its error.
    """
    errors = [error for error in map(terminal_error, results.values()) if error]
    if errors:
        raise RuntimeError(f"{len(errors)} job(s) of wave {depth} failed and were not retried (the same "
                           "settings fail the same way; change them and run under a new name):\n  "
                           + "\n  ".join(errors))


class ParentRunGuard:
    """A ``with`` block that ends the watched MLflow parent run FAILED when it raises (KILLED when interrupted).

    A run that returns ends its parent itself (FINISHED). Ending it may fail too (an
    unreachable server): that is logged, and the original error goes on.

    Example:
        >>> with ParentRunGuard() as guard:  # doctest: +SKIP
        ...     parent = start_parent_run(target, name)
        ...     guard.watch(lambda status: end_parent_run(target, parent, status=status))
        ...     run_waves()
    """

    def __init__(self) -> None:
        self._end: Callable[[str], Any] | None = None

    def watch(self, end: Callable[[str], Any]) -> None:
        """From now on, an error ends the parent with ``end(status)``."""
        self._end = end

    def __enter__(self) -> ParentRunGuard:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or self._end is None:
            return False
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self._end(status)
        except Exception as end_error:  # noqa: BLE001 - keep the run's own error
            logger.warning("could not end the MLflow parent run as %s: %s", status, end_error)
        return False


def _cause(exc: BaseException) -> BaseException | None:
    """The error a Ray wrapper carries (a task's, a Train worker's or controller's), or None."""
    ray_exceptions = sys.modules.get("ray.exceptions")  # Ray's errors exist only once Ray was imported
    if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError):
        return exc.cause if isinstance(exc.cause, BaseException) else None
    failures = getattr(exc, "worker_failures", None)  # ray.train WorkerGroupError: rank -> error
    if isinstance(failures, dict) and failures:
        return next(iter(failures.values()))
    inner = getattr(exc, "controller_failure", None)  # ray.train ControllerError
    return inner if isinstance(inner, BaseException) else None


def describe_error(exc: BaseException) -> str:
    """The message ``medcl`` prints for a runtime failure: Ray's wrappers taken off, no traceback.

    Args:
        exc: What the command raised.

    Returns:
        The error's own message (``Type: message`` for Python's built-in errors), or what to do
        about a full disk.
    """
    for _ in range(5):
        inner = _cause(exc)
        if inner is None:
            break
        exc = inner
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"no space left on device{where}; free some space, or put storage_path (--out) on a larger disk, "
                "then run the same command again to resume")
    text = str(exc).strip() or type(exc).__name__
    if type(exc) is RuntimeError or type(exc).__module__.startswith("medcl"):
        return text
    return f"{type(exc).__name__}: {text}"

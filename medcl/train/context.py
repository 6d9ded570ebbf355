"""Where a stage's loop runs: a Ray Train worker, or inline in one Ray Tune trial.

The stage loops are written once against :class:`StageContext`. Under
``TorchTrainer`` (any number of workers, CPU/gloo or GPU/NCCL) the context
maps onto ``ray.train``; for a single CPU worker inside a Tune trial it maps
onto ``ray.tune`` so that a tiny trial does not pay the ~20 s start-up of a
worker group. Both use Ray's own checkpoint persistence, restore and failure
handling.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["StageContext", "RayTrainContext", "TuneTrialContext"]


@dataclass
class StageContext:
    """What a stage loop needs from its runner.

    Attributes:
        world_rank: Rank of this worker (0 in a single process).
        world_size: Number of workers sharing the data.
        device: Device the model and batches live on.
        distributed: Whether a torch.distributed process group spans the workers.
    """

    world_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    def dataset(self, name: str) -> Any:
        """The data this worker reads for ``name`` (supports ``iter_torch_batches``)."""
        raise NotImplementedError

    def has_dataset(self, name: str) -> bool:
        raise NotImplementedError

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        """Report metrics (every rank), with a checkpoint directory from rank 0 at intervals."""
        raise NotImplementedError

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """The latest persisted checkpoint of this run as a local directory, or None."""
        raise NotImplementedError
        yield None  # pragma: no cover

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and wrap for data parallelism where there is more than one worker."""
        return model.to(self.device)

    @property
    def is_rank_zero(self) -> bool:
        return self.world_rank == 0


class RayTrainContext(StageContext):
    """Inside ``TorchTrainer``'s ``train_loop_per_worker`` (Ray Train V2)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        super().__init__(
            world_rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            device=ray.train.torch.get_device(),
            distributed=ctx.get_world_size() > 1,
        )

    def dataset(self, name: str) -> Any:
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        if shard is None:
            raise KeyError(f"no dataset named {name!r} was given to the trainer")
        return shard

    def has_dataset(self, name: str) -> bool:
        import ray.train

        try:
            return ray.train.get_dataset_shard(name) is not None
        except (KeyError, ValueError):
            return False

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # Moves to the worker's device; wraps in DDP only when world_size > 1.
        return ray.train.torch.prepare_model(model)


class TuneTrialContext(StageContext):
    """A single-worker stage run inline in a Ray Tune function trainable.

    Args:
        datasets: Ray Datasets by name (the whole dataset: there is one worker).
        use_gpu: Put the model on the trial's GPU.
    """

    def __init__(self, datasets: dict[str, Any], use_gpu: bool = False) -> None:
        device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        super().__init__(world_rank=0, world_size=1, device=device, distributed=False)
        self._datasets = dict(datasets)

    def dataset(self, name: str) -> Any:
        if name not in self._datasets:
            raise KeyError(f"no dataset named {name!r}; have {sorted(self._datasets)}")
        return self._datasets[name]

    def has_dataset(self, name: str) -> bool:
        return name in self._datasets

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)


def temporary_checkpoint_dir() -> tempfile.TemporaryDirectory:
    """A scratch directory for one checkpoint; Ray copies it into run storage on report."""
    return tempfile.TemporaryDirectory(prefix="medcl-ckpt-")

"""A StageContext for one in-process worker (no Ray, no DDP), shared by tests that run a stage loop directly."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from medcl.train.context import StageContext


class InProcessContext(StageContext):
    """Serves ``streams`` by name and keeps every report (and, with ``keep``, a copy of every checkpoint, or of the
    latest only with ``keep_last_only``)."""

    def __init__(self, streams: dict, keep: Path | None = None, keep_last_only: bool = False) -> None:
        super().__init__()
        self.streams = streams
        self.keep = keep
        self.keep_last_only = keep_last_only  # large checkpoints (ResNet-18: ~140 MB an epoch)
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []

    def dataset(self, name):
        return self.streams[name]

    def has_dataset(self, name):
        return name in self.streams

    def report(self, metrics, checkpoint_dir=None):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.keep is not None:
            target = self.keep / f"epoch{int(metrics['epoch'])}"
            shutil.copytree(checkpoint_dir, target)
            if self.keep_last_only:
                for old in self.checkpoints:
                    shutil.rmtree(old)
                self.checkpoints.clear()
            self.checkpoints.append(target)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield None

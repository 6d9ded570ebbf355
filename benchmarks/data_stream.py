"""Throughput of the labelled-slice stream with augmentation: Ray Data vs pyarrow + torch DataLoader.

Same shards, same labelled patients, same batched ``JointTransform``, one process:

  (a) ray-augment   ``labelled_slices(..., augment=JointTransform())`` (augmentation in Ray Data
                    CPU tasks) consumed with ``iter_torch_batches`` (``torch_batches``);
  (b) ray+worker    ``labelled_slices(...)`` without augment, JointTransform applied by the
                    consumer on each batch (augmentation "on the worker");
  (c) pyarrow+DL    pyarrow read + ``decode_images``/``decode_masks`` into memory, then a torch
                    ``DataLoader`` (shuffled batches) whose collate applies the JointTransform.

Setup (read, decode, materialise) is timed apart from the epochs; images/s are per epoch and
the steady state is the mean of epochs 2..E. A second table compares the batched view
transforms of ``medcl.data.augment`` with a per-sample ``torchvision.transforms.v2`` loop (the
way to get per-sample randomness from v2) at 64x64.

Usage:
    python benchmarks/data_stream.py                       # hippocampus (shared data) or synthetic, in a tmp dir
    python benchmarks/data_stream.py --dataset DIR --epochs 4 --batch-size 64
    python benchmarks/data_stream.py --augment-only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medcl.data.augment import JointTransform, make_views  # noqa: E402


def build_dataset(tmp: Path, source: str) -> Path:
    """Ingest the hippocampus task from the shared data (or the synthetic cohort) into ``tmp``."""
    from medcl.data.ingest import ingest

    shared = Path(os.environ.get("MEDCL_SHARED_DATA", REPO.parent / "shared" / "data"))
    out = tmp / source
    t = time.perf_counter()
    if source == "hippocampus":
        task = shared / "Task04_Hippocampus"
        if not task.is_dir():
            raise SystemExit(f"{task} not found; set MEDCL_SHARED_DATA or use --source synthetic")
        ingest("msd", task, out, {"size": 64})
    else:
        ingest("synthetic", None, out, {"num_patients": 200, "images_per_patient": 24, "size": 64})
    print(f"ingested {source} into {out} in {time.perf_counter() - t:.1f} s")
    return out


def _epoch_rates(epochs: int, run_epoch) -> list[tuple[int, float]]:
    out = []
    for _ in range(epochs):
        t = time.perf_counter()
        n = run_epoch()
        out.append((n, time.perf_counter() - t))
    return out


def bench_ray(dataset: Path, fraction: float, epochs: int, batch_size: int, in_data: bool):
    from medcl.data.collate import torch_batches
    from medcl.data.streams import labelled_slices

    joint = JointTransform()
    t = time.perf_counter()
    ds = labelled_slices(dataset, fraction, 0, augment=joint if in_data else None)
    setup = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)

    def run_epoch() -> int:
        n = 0
        for batch in torch_batches(ds, batch_size, device="cpu", local_shuffle_buffer_size=4 * batch_size):
            image, mask = batch["image"], batch["mask"]
            if not in_data:
                image, mask = joint(image, mask, gen)
            n += image.shape[0]
        return n

    return setup, _epoch_rates(epochs, run_epoch)


def bench_dataloader(dataset: Path, fraction: float, epochs: int, batch_size: int, workers: int):
    import pyarrow.compute as pc

    from medcl.data.decode import decode_images, decode_masks, read_shards_table
    from medcl.data.splits import labelled_patients

    t = time.perf_counter()
    patients = labelled_patients(dataset, fraction, 0)
    table = read_shards_table(
        dataset, columns=["image", "image_shape", "mask"],
        filter=(pc.field("split") == "train") & pc.field("patient_id").isin(patients) & ~pc.field("mask").is_null())
    images = torch.from_numpy(np.require(decode_images(table), requirements=["C", "W"]))
    masks = torch.from_numpy(np.require(decode_masks(table), requirements=["C", "W"]))
    setup = time.perf_counter() - t
    joint = JointTransform()
    gen = torch.Generator().manual_seed(0)

    def collate(items):
        idx = torch.tensor(items)
        return joint(images[idx], masks[idx], gen if workers == 0 else None)

    loader = torch.utils.data.DataLoader(range(len(images)), batch_size=batch_size, shuffle=True,
                                         collate_fn=collate, num_workers=workers,
                                         persistent_workers=workers > 0)

    def run_epoch() -> int:
        return sum(img.shape[0] for img, _ in loader)

    return setup, _epoch_rates(epochs, run_epoch)


def report(name: str, setup: float, rates: list[tuple[int, float]]) -> float:
    per_epoch = [n / s for n, s in rates]
    steady = statistics.mean(per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]
    print(f"{name:<14} setup {setup:6.2f} s   rows/epoch {rates[0][0]:6d}   images/s per epoch "
          + " ".join(f"{r:8.0f}" for r in per_epoch) + f"   steady {steady:8.0f}")
    return steady


def bench_augment(batch_size: int = 64, size: int = 64, repeats: int = 10) -> None:
    from torchvision.transforms import v2

    ref = {
        "simclr": (3, v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(0.2),
            v2.RandomApply([v2.GaussianBlur(int(0.1 * size) // 2 * 2 + 1, (0.1, 2.0))], p=0.5)])),
        "medical": (1, v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomRotation(45),
            v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8)])),
        "intensity": (1, v2.Compose([v2.ColorJitter(0.4, 0.4)])),
    }
    print(f"\naugmentation, batch {batch_size} x {size}x{size}, ms per batch "
          f"(CPU, {torch.get_num_threads()} threads)")
    print(f"{'kind':<10} {'C':>2} {'batched':>9} {'v2 loop':>9} {'speed-up':>9}   (min over {repeats} calls)")
    gen = torch.Generator().manual_seed(0)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * min(times)

    for kind, (c, tf) in ref.items():
        x = torch.rand(batch_size, c, size, size)
        view = make_views(kind).view
        batched = best(lambda: view(x, gen))
        loop = best(lambda: torch.stack([tf(i) for i in x]))
        print(f"{kind:<10} {c:>2} {batched:9.1f} {loop:9.1f} {loop / batched:8.1f}x")
    x = torch.rand(batch_size, 1, size, size)
    m = (x[:, 0] > 0.5).long()
    joint = JointTransform()
    print(f"{'joint':<10} {1:>2} {best(lambda: joint(x, m, gen)):9.1f}   (image + mask)")
    print("(intensity's v2 reference is ColorJitter only; the batched view also does gamma and noise)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, help="dataset dir (default: ingest --source into a tmp dir)")
    p.add_argument("--source", choices=["hippocampus", "synthetic"], default="hippocampus")
    p.add_argument("--fraction", type=float, default=1.0, help="labelled fraction of training patients")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader num_workers for (c)")
    p.add_argument("--num-cpus", type=int, default=None, help="ray.init(num_cpus=...) (default: all)")
    p.add_argument("--augment-only", action="store_true", help="only the batched-vs-v2-loop table")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in this process (Ray tasks run with 1; on a loaded machine "
                        "more threads make every small op wait for a core)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average at the start: {' '.join(f'{v:.1f}' for v in os.getloadavg())} ({os.cpu_count()} cores)")

    bench_augment(args.batch_size)
    if args.augment_only:
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    with tempfile.TemporaryDirectory(prefix="medcl-bench-") as tmp:
        dataset = args.dataset or build_dataset(Path(tmp), args.source)
        t = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, object_store_memory=1_500_000_000, log_to_driver=False,
                 logging_level=logging.WARNING, _temp_dir=f"/tmp/mcb-{os.getpid()}")
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        print(f"\nray.init {time.perf_counter() - t:.1f} s; dataset {dataset}; fraction {args.fraction}; "
              f"batch {args.batch_size}; {args.epochs} epochs; {os.cpu_count()} CPU cores")
        a = report("ray-augment", *bench_ray(dataset, args.fraction, args.epochs, args.batch_size, in_data=True))
        b = report("ray+worker", *bench_ray(dataset, args.fraction, args.epochs, args.batch_size, in_data=False))
        c = report("pyarrow+DL", *bench_dataloader(dataset, args.fraction, args.epochs, args.batch_size,
                                                   args.loader_workers))
        print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(f"\nsteady-state ratio ray-augment / pyarrow+DL = {a / c:.2f}; ray+worker / pyarrow+DL = {b / c:.2f}")
        ray.shutdown()


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

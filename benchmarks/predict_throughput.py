"""Throughput of ``medcl predict`` (Ray Data, actor pool) vs a plain PyTorch loop over the same slices (issue 16).

One process, the same exported U-Net (the hippocampus architecture, 16…256, random weights: the
figures are about throughput, not accuracy), the same slices:

  (a) plain loop   the slices ``medcl ingest`` wrote for every volume (read into memory first,
                   untimed), ``net(x).argmax(1)`` in batches of ``--batch-size`` under
                   ``torch.inference_mode`` with torch's default threads (every core);
  (b) medcl predict  :func:`medcl.predict.predict` (what ``medcl predict`` runs) on the raw NIfTI
                   files of ``imagesTr``: read + reorient + normalise + resize in Ray tasks, the
                   model in an actor pool of ``--num-workers``, masks resized back, reoriented
                   and written as NIfTI. Timed from the call to the last file written (actor
                   start-up included); Ray's own start-up is timed apart and reported.

The plain loop runs before and after (b), so load drift on a shared machine shows, and once
more with one torch thread (what each actor uses). Prints images/s of each and the ratio
(b) / mean of (a).

Usage:
    python benchmarks/predict_throughput.py                        # Task04_Hippocampus from the shared data
    python benchmarks/predict_throughput.py --num-workers 2 --batch-size 64 --dataset DIR
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tiny_export: the model, exported with medcl's own export code

HIPPO_UNET = [16, 32, 64, 128, 256]


def plain_loop(net: torch.nn.Module, slices: np.ndarray, batch_size: int) -> tuple[float, int]:
    """Seconds and foreground pixels of ``net(x).argmax(1)`` over ``slices`` in batches."""
    x = torch.from_numpy(slices)
    start, fg = time.perf_counter(), 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            fg += int((net(x[i:i + batch_size]).argmax(1) > 0).sum())
    return time.perf_counter() - start, fg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("MEDCL_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--task", type=Path, default=shared / "Task04_Hippocampus")
    parser.add_argument("--dataset", type=Path, default=None, help="its ingest (default: ingested into a tmp dir)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from tiny_export import train_and_export

    from medcl.data.decode import decode_images, read_shards_table
    from medcl.data.ingest import ingest
    from medcl.model_card import load_model
    from medcl.predict import predict
    from medcl.runner.session import init_ray

    print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="medcl-predict-bench-") as tmp:
        root = Path(tmp)
        dataset = args.dataset
        if dataset is None:
            t = time.perf_counter()
            dataset = root / "hippocampus64"
            ingest("msd", args.task, dataset, {"size": 64})
            print(f"ingest of {args.task}: {time.perf_counter() - t:.1f} s")
        model = train_and_export(dataset, root / "model", features=HIPPO_UNET)
        net, card = load_model(model)
        table = read_shards_table(dataset, columns=["image", "image_shape"])
        slices = np.array(decode_images(table))
        n_volumes = len(list(args.task.glob("imagesTr/*.nii.gz")))
        print(f"{n_volumes} volumes, {len(slices)} slices of {list(slices.shape[1:])}; model {card.architecture} "
              f"{card.model_spec['features']}")

        plain_loop(net, slices[: args.batch_size], args.batch_size)  # warm-up
        before, fg_plain = plain_loop(net, slices, args.batch_size)
        t = time.perf_counter()
        init_ray()
        ray_start = time.perf_counter() - t
        t = time.perf_counter()
        result = predict(model, args.task / "imagesTr", root / "pred", num_workers=args.num_workers,
                         batch_size=args.batch_size, cpus_per_worker=args.cpus_per_worker)
        wall = time.perf_counter() - t
        after, _ = plain_loop(net, slices, args.batch_size)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread, as each actor runs: intra-op sync costs under load show here
        single, _ = plain_loop(net, slices, args.batch_size)
        torch.set_num_threads(threads)

        plain_rate = len(slices) / ((before + after) / 2)
        rate = result.images / wall
        print(f"plain loop:    {len(slices) / before:7.1f} images/s before, {len(slices) / after:7.1f} after "
              f"(mean {plain_rate:.1f}); {fg_plain} foreground pixels")
        print(f"medcl predict: {rate:7.1f} images/s ({result.images} slices of {result.inputs} volumes in {wall:.1f} s, "
              f"{args.num_workers} actor(s) x {args.cpus_per_worker:g} CPU, batch {args.batch_size}; "
              f"{len(result.files)} files written)")
        print(f"plain loop, 1 thread: {len(slices) / single:7.1f} images/s")
        print(f"ratio predict / plain: {rate / plain_rate:.2f} (vs the 1-thread loop: {rate * single / len(slices):.2f})")
        print(f"Ray start-up (excluded): {ray_start:.1f} s; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

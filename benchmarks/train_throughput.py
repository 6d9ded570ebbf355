"""Global-pretraining throughput: medcl's stage on a 1-worker TorchTrainer vs. a plain PyTorch loop.

Both train the CPU-preset U-Net encoder with NT-Xent on two medical views of
the same shards, with the same batch size and the same number of torch
threads; images/s counts both views. The plain loop reads the shards once
with pyarrow and iterates shuffled in-memory batches (the floor of what a
hand-written loop does); the TorchTrainer numbers are the stage's own per-epoch
``train/images_per_s`` after the first epoch, with start-up reported apart.

    python benchmarks/train_throughput.py                      # hippocampus at 64x64 if found, else synthetic
    python benchmarks/train_throughput.py --dataset DIR --epochs 4 --threads 2
    python benchmarks/train_throughput.py --use-gpu --unet paper --batch 64   # GPU: bf16 autocast, paper U-Net (64..1024)

With ``--use-gpu`` both paths run on the GPU under bf16 autocast (the stage's
own AMP setting on CUDA) and the plain loop keeps the images on the device.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_dataset(args) -> str:
    from medcl.data.ingest import ingest

    if args.dataset:
        return args.dataset
    out = Path(tempfile.gettempdir()) / "medcl-bench-train"
    hippo = Path(os.environ.get("MEDCL_SHARED_DATA", REPO.parent / "shared" / "data")) / "Task04_Hippocampus"
    if hippo.is_dir():
        ingest("msd", hippo, out / "hippocampus64", {"size": 64})
        return str(out / "hippocampus64")
    ingest("synthetic", None, out / "synthetic64", {"num_patients": 120, "images_per_patient": 16, "size": 64})
    return str(out / "synthetic64")


def plain_loop(dataset: str, cfg, steps: int, threads: int, use_gpu: bool = False) -> float:
    """images/s of a hand-written single-process loop over the same shards (steady state)."""
    from medcl.data.augment import make_views
    from medcl.data.decode import decode_images, read_shards_table
    from medcl.losses import nt_xent
    from medcl.train.nets import UNetPart, build_unet
    from medcl.train.runtime import autocast_context

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if use_gpu else "cpu")
    images = torch.from_numpy(decode_images(read_shards_table(dataset, filter=[("split", "=", "train")])).copy())
    images = images.to(device)
    net = UNetPart(build_unet(cfg.model, images.shape[1], 3), "global").to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    views = make_views(cfg.views)
    bs = cfg.batch_size_per_worker
    done, start = 0, None
    for step in range(steps + 3):
        if step == 3:  # warm-up excluded
            if use_gpu:
                torch.cuda.synchronize()  # the warm-up's queued kernels are not counted
            start = time.perf_counter()
        idx = torch.randint(0, len(images), (bs,), device=device)
        v1, v2 = views(images[idx])
        with autocast_context(device, enabled=use_gpu):
            z1, z2 = net(torch.cat([v1, v2])).chunk(2)
            loss = nt_xent(z1.float(), z2.float(), temperature=cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if start is not None:
            done += 2 * bs
    if use_gpu:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def trainer_run(dataset: str, cfg, threads: int, storage: str, use_gpu: bool = False) -> tuple[float, float, list[float]]:
    """(start-up seconds, steady images/s, per-epoch images/s) of the stage on a 1-worker TorchTrainer."""
    import mlflow  # noqa: F401  (imported here so its import time is not counted as start-up)

    from medcl import tracking as mlt
    from medcl.config.stages import ScalingSpec
    from medcl.train.driver import run_stage

    target = mlt.configure_tracking(experiment="bench-throughput", workdir=storage)
    parent = mlt.parent_run_id(target, f"bench-{time.time_ns()}")
    run_id = mlt.child_run_id(target, parent, "global")
    t0 = time.perf_counter()
    run_stage(cfg, dataset, scaling=ScalingSpec(num_workers=1, cpus_per_worker=threads, use_gpu=use_gpu), storage_path=storage,
              name=f"bench-{time.time_ns()}", tracking={"tracking_uri": target.tracking_uri, "run_id": run_id})
    total = time.perf_counter() - t0
    history = target.client().get_metric_history(run_id, "train/images_per_s")
    per_epoch = [m.value for m in sorted(history, key=lambda m: m.step)]
    epoch_s = [m.value for m in sorted(target.client().get_metric_history(run_id, "train/epoch_time_s"), key=lambda m: m.step)]
    steady = sum(per_epoch[1:]) / max(1, len(per_epoch) - 1)
    startup = total - sum(epoch_s) if epoch_s else float("nan")
    return startup, steady, per_epoch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--plain-steps", type=int, default=40)
    parser.add_argument("--unet", choices=["cpu", "paper"], default="cpu",
                        help="U-Net preset: cpu (16..256) or paper (64..1024)")
    parser.add_argument("--use-gpu", action="store_true", help="run both paths on the GPU with bf16 autocast")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.use_gpu and not torch.cuda.is_available():
        parser.error("--use-gpu: torch sees no CUDA device")

    from medcl.config.stages import GlobalPretrainConfig, UNetSpec
    from medcl.runner.session import init_ray

    dataset = make_dataset(args)
    widths = (16, 32, 64, 128, 256) if args.unet == "cpu" else (64, 128, 256, 512, 1024)
    cfg = GlobalPretrainConfig(max_epochs=args.epochs, batch_size_per_worker=args.batch, lr=1e-3,
                               temperature=0.5, model=UNetSpec(features=widths))
    plain = plain_loop(dataset, cfg, args.plain_steps, args.threads, args.use_gpu)
    init_ray(num_cpus=max(4, 2 * (os.cpu_count() or 2)))  # Ray detects the GPU itself
    with tempfile.TemporaryDirectory() as storage:
        startup, steady, per_epoch = trainer_run(dataset, cfg, args.threads, storage, args.use_gpu)
    print(f"dataset: {dataset}")
    where = f"GPU {torch.cuda.get_device_name(0)}, bf16 autocast" if args.use_gpu else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch} (x2 views), {args.unet}-preset U-Net {list(widths)} 64x64")
    print(f"{'path':<34}{'images/s':>10}")
    print(f"{'plain PyTorch loop (in memory)':<34}{plain:>10.1f}")
    print(f"{'TorchTrainer, 1 worker (steady)':<34}{steady:>10.1f}")
    print(f"ratio TorchTrainer / plain: {steady / plain:.2f}")
    print(f"TorchTrainer per epoch images/s: {[round(v, 1) for v in per_epoch]}")
    print(f"TorchTrainer start-up + streams + evaluation (s): {startup:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

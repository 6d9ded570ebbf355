"""Training throughput: a medcl stage on a 1-worker TorchTrainer vs. a plain PyTorch loop.

``--stage global`` trains the CPU-preset U-Net encoder with NT-Xent on two medical
views (images/s counts both views); ``--stage finetune`` trains the whole U-Net
with CE + soft Dice on labelled slices under the fine-tuning augmentation, at
``--fraction`` of the labelled subjects (small fractions cycle a small stream: one
Ray Data pass every few steps). Both paths use the same batch size and the same
number of torch threads. The plain loop reads the shards once with pyarrow and
indexes shuffled batches of an in-memory tensor (the floor of what a
hand-written loop does); it also runs with ``channels_last`` and with
``torch.compile`` (compile time reported apart), the two speed-ups the recipe
could adopt. The TorchTrainer figures are the stage's own per-epoch
``train/images_per_s`` after the first epoch, with start-up reported apart.

    python benchmarks/train_throughput.py                      # global stage, hippocampus at 64x64 if found, else synthetic
    python benchmarks/train_throughput.py --stage finetune --fraction 0.01 --epochs 4
    python benchmarks/train_throughput.py --dataset DIR --epochs 4 --threads 2 --no-variants
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


def plain_loop(dataset: str, cfg, steps: int, threads: int, use_gpu: bool = False,
               variant: str = "plain") -> tuple[float, float]:
    """(images/s in steady state, warm-up seconds) of a hand-written single-process loop over the same shards.

    ``variant``: ``plain``, ``channels_last`` (weights and batches in NHWC) or ``compile``
    (``torch.compile`` of the network; its compilation is the warm-up).
    """
    from medcl.config.stages import GlobalPretrainConfig
    from medcl.data.augment import JointTransform, make_views
    from medcl.data.decode import decode_images, decode_masks, read_shards_table
    from medcl.losses import nt_xent, segmentation_loss
    from medcl.train.nets import UNetPart, build_unet
    from medcl.train.runtime import autocast_context

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if use_gpu else "cpu")
    table = read_shards_table(dataset, filter=[("split", "=", "train")])
    images = torch.from_numpy(decode_images(table).copy()).to(device)
    pretrain = isinstance(cfg, GlobalPretrainConfig)
    unet = build_unet(cfg.model, images.shape[1], 3)
    net = (UNetPart(unet, "global") if pretrain else unet).to(device)
    if variant == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    forward = torch.compile(net) if variant == "compile" else net
    layout = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    bs = cfg.batch_size_per_worker
    if pretrain:
        views = make_views(cfg.views)

        def step(idx):
            v1, v2 = views(images[idx])
            with autocast_context(device, enabled=use_gpu):
                z1, z2 = forward(torch.cat([v1, v2]).contiguous(memory_format=layout)).chunk(2)
                loss = nt_xent(z1.float(), z2.float(), temperature=cfg.temperature)
            return loss, 2 * len(idx)
    else:
        masks = torch.from_numpy(decode_masks(table).astype("int64")).to(device)
        joint = JointTransform()

        def step(idx):
            x, y = joint(images[idx], masks[idx])
            with autocast_context(device, enabled=use_gpu):
                loss = segmentation_loss(forward(x.contiguous(memory_format=layout)).float(), y)
            return loss, len(idx)

    done, start, warm_up = 0, None, 0.0
    t0 = time.perf_counter()
    for i in range(steps + 3):
        if i == 3:  # warm-up (and compilation) excluded
            if use_gpu:
                torch.cuda.synchronize()  # the warm-up's queued kernels are not counted
            start = time.perf_counter()
            warm_up = start - t0
        loss, n = step(torch.randint(0, len(images), (bs,), device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if start is not None:
            done += n
    if use_gpu:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start), warm_up


def trainer_run(dataset: str, cfg, threads: int, storage: str, use_gpu: bool = False) -> tuple[float, float, list[float]]:
    """(start-up seconds, steady images/s, per-epoch images/s) of the stage on a 1-worker TorchTrainer."""
    import mlflow  # noqa: F401  (imported here so its import time is not counted as start-up)

    from medcl import tracking as mlt
    from medcl.config.stages import ScalingSpec
    from medcl.train.driver import run_stage

    target = mlt.configure_tracking(experiment="bench-throughput", workdir=storage)
    parent = mlt.parent_run_id(target, f"bench-{time.time_ns()}")
    run_id = mlt.child_run_id(target, parent, cfg.kind)
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


def stage_config(args):
    """The stage under test: CPU-preset (or paper) U-Net, the recipe's optimiser settings."""
    from medcl.config.stages import GlobalPretrainConfig, SegFinetuneConfig, UNetSpec

    widths = (16, 32, 64, 128, 256) if args.unet == "cpu" else (64, 128, 256, 512, 1024)
    model = UNetSpec(features=widths)
    if args.stage == "global":
        return GlobalPretrainConfig(max_epochs=args.epochs, batch_size_per_worker=args.batch, lr=1e-3,
                                    temperature=0.5, model=model)
    # The hippocampus --smoke fine-tune: 60-step epochs (a small labelled set is cycled), no
    # validation passes (they are evaluation, not training throughput).
    return SegFinetuneConfig(max_epochs=args.epochs, batch_size_per_worker=args.batch, label_fraction=args.fraction,
                             min_steps_per_epoch=60, max_steps_per_epoch=60, val_every=0, model=model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--stage", choices=["global", "finetune"], default="global",
                        help="global pretraining (NT-Xent, two views) or segmentation fine-tuning (CE + Dice)")
    parser.add_argument("--fraction", type=float, default=0.01, help="label fraction of --stage finetune")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="batch per step (default 32 global, 8 finetune)")
    parser.add_argument("--plain-steps", type=int, default=40)
    parser.add_argument("--unet", choices=["cpu", "paper"], default="cpu",
                        help="U-Net preset: cpu (16..256) or paper (64..1024)")
    parser.add_argument("--no-variants", action="store_true", help="skip the channels_last and torch.compile plain loops")
    parser.add_argument("--use-gpu", action="store_true", help="run both paths on the GPU with bf16 autocast")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 32 if args.stage == "global" else 8
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.use_gpu and not torch.cuda.is_available():
        parser.error("--use-gpu: torch sees no CUDA device")

    from medcl.runner.session import init_ray

    dataset = make_dataset(args)
    cfg = stage_config(args)
    variants = ["plain"] if args.no_variants else ["plain", "channels_last", "compile"]
    plain = {v: plain_loop(dataset, cfg, args.plain_steps, args.threads, args.use_gpu, variant=v) for v in variants}
    init_ray(num_cpus=max(4, 2 * (os.cpu_count() or 2)))  # Ray detects the GPU itself
    with tempfile.TemporaryDirectory() as storage:
        startup, steady, per_epoch = trainer_run(dataset, cfg, args.threads, storage, args.use_gpu)
    base = plain["plain"][0]
    print(f"dataset: {dataset}")
    where = f"GPU {torch.cuda.get_device_name(0)}, bf16 autocast" if args.use_gpu else f"CPU, {args.threads} threads"
    what = "NT-Xent, x2 views" if args.stage == "global" else f"CE + Dice, label fraction {args.fraction}"
    print(f"torch {torch.__version__}, {where}, stage {args.stage} ({what}), batch {args.batch}, "
          f"{args.unet}-preset U-Net {list(cfg.model.features)} 64x64")
    print(f"{'path':<38}{'images/s':>10}{'/ plain':>9}{'warm-up s':>11}")
    for v, (rate, warm) in plain.items():
        print(f"{'plain PyTorch loop, ' + v:<38}{rate:>10.1f}{rate / base:>9.2f}{warm:>11.1f}")
    print(f"{'TorchTrainer, 1 worker (steady)':<38}{steady:>10.1f}{steady / base:>9.2f}{startup:>11.1f}")
    print(f"TorchTrainer per epoch images/s: {[round(v, 1) for v in per_epoch]}")
    print("TorchTrainer warm-up = start-up + streams + evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())

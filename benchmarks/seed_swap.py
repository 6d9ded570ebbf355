"""Is a seed's fine-tuned Dice set by its labelled subjects or by its initialisation?

Fine-tunes the hippocampus U-Net once with the labelled subset drawn by
``--subset-seed`` and everything else (weights, batch order, augmentation)
seeded by ``--init-seed``, on the CPU protocol of ``pipelines/hippocampus.yaml
--smoke`` (600 steps of 8); also prints, per seed, the initial network's mean
predicted class probabilities and its initial loss on 64 training slices.

    python benchmarks/seed_swap.py --subset-seed 1 --init-seed 0 --fraction 0.2
    python benchmarks/seed_swap.py --init-only          # only the initial-state figures, seconds

The initial-state figures are of a freshly built network, before the
segmentation head is set to the class prior (which fine-tuning now does first);
``benchmarks/recipe_checks.py --only seg`` prints them before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def initial_state(dataset: str, cfg, seeds: list[int]) -> None:
    """Mean softmax per class and CE + soft Dice of the untrained U-Net, per seed."""
    from medcl.data.decode import decode_images, decode_masks, read_shards_table
    from medcl.losses import segmentation_loss
    from medcl.train.nets import UNetPart, build_unet
    from medcl.train.runtime import seed_everything

    table = read_shards_table(dataset, filter=[("split", "=", "train")])
    images = torch.from_numpy(decode_images(table)[:64].copy())
    masks = torch.from_numpy(decode_masks(table)[:64].copy()).long()
    for seed in seeds:
        seed_everything(seed, 0)
        net = UNetPart(build_unet(cfg.model, images.shape[1], 3), "logits").eval()
        with torch.no_grad():
            logits = net(images)
        probs = logits.softmax(1).mean((0, 2, 3)).tolist()
        print(f"init seed {seed}: mean class probabilities {[round(p, 3) for p in probs]}, "
              f"initial loss {segmentation_loss(logits, masks).item():.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(REPO / "medcl_data" / "hippocampus64"),
                        help="ingested hippocampus dir (medcl run pipelines/hippocampus.yaml writes it)")
    parser.add_argument("--subset-seed", type=int, default=1)
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--init-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not Path(args.dataset, "manifest.json").is_file():
        parser.error(f"--dataset {args.dataset}: no manifest.json (ingest Task04_Hippocampus first)")
    torch.set_num_threads(1)

    from medcl.config.pipeline import load_pipeline

    cfg = load_pipeline(REPO / "pipelines" / "hippocampus.yaml", smoke=True).stage("finetune")
    cfg = dataclasses.replace(cfg, label_fraction=args.fraction)
    initial_state(args.dataset, cfg, [0, 1, 2])
    if args.init_only:
        return 0

    from medcl.config.stages import ScalingSpec
    from medcl.runner.session import init_ray
    from medcl.data.streams import build_streams
    from medcl.train.driver import STAGES, run_stage

    dataset = str(Path(args.dataset).resolve())
    init_ray(num_cpus=2)
    # the subset comes from the streams built with --subset-seed; the stage itself runs with --init-seed
    subset_cfg = dataclasses.replace(cfg, seed=args.subset_seed)
    streams = build_streams(STAGES["seg_finetune"].datasets(subset_cfg, dataset))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        result = run_stage(dataclasses.replace(cfg, seed=args.init_seed), dataset, streams=streams,
                           scaling=ScalingSpec(num_workers=1, cpus_per_worker=1), storage_path=storage, name="seed-swap")
    m = result.metrics
    print(f"subset seed {args.subset_seed}, init seed {args.init_seed}, fraction {args.fraction}: "
          f"pooled 2D Dice {m['test/dice_2d']:.3f}, 3D Dice {m['test/dice_3d_mean']:.3f}, "
          f"final train loss {m['train/loss']:.3f} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

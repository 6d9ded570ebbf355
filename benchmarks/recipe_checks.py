"""Before/after figures of three recipe fixes of issue 14, on ingested hippocampus slices (64x64).

* ``head`` (defect 2): how different the global head's input and output are across
  different slices at init (mean pairwise cosine over 256 training slices), for the
  old global average pool and the candidates, and the start of the global
  pretraining loss (NT-Xent, tau 0.5, ``medical`` views, batch 32, CPU-preset U-Net
  16..256, AdamW 3e-4) as means of 10 steps against chance ``ln(2B-1)``.
* ``seg`` (defect 4): the initial fine-tuning loss (CE + soft Dice, batches of 8 of
  the labelled slices, in stream order) and the mean predicted background probability
  per seed, at 5 % labels, with the default head init and with the stage's own
  class-prior init (``SegFinetune.prepare`` on the stage's Ray training stream).
* ``views`` (defect 6): relative change of the features between the two views of a
  pair (last decoder map; global head input, pooled as before and as now), for the
  views as they were and as they are, at init.

    python benchmarks/recipe_checks.py --dataset /tmp/hippo64                 # all three
    python benchmarks/recipe_checks.py --dataset DIR --only head --steps 100 --curves all
    python benchmarks/recipe_checks.py --dataset DIR --only seg --fraction 0.05 --seeds 0 1 2 3 4

"Before" views are rebuilt here from the augmentation module's own ops, as the views
were: ``IntensityView`` = brightness and contrast factors in [0.6, 1.4], gamma in
[0.7, 1.5], noise std up to 0.03; ``MedicalView`` intensity = brightness and contrast
factors in [0.6, 1.4] (p=0.8). The old head is ``UNet(global_grid=1)``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medcl.data import augment as A  # noqa: E402
from medcl.models import UNet  # noqa: E402
from medcl.models.unet import CPU_FEATURES  # noqa: E402


# --------------------------------------------------------------------------- data
def train_images(dataset: str) -> torch.Tensor:
    from medcl.data.decode import decode_images, read_shards_table

    table = read_shards_table(dataset, filter=[("split", "=", "train")])
    return torch.from_numpy(decode_images(table).copy())


def mean_cosine(v: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of different rows."""
    v = F.normalize(v.flatten(1).double(), dim=1)
    sim = v @ v.T
    n = len(v)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


# --------------------------------------------------------------------------- defect 2
class HeadCandidate(nn.Module):
    """Encoder + global head of one candidate design; ``head_input(x)`` is what the MLP sees.

    ``gap``: global average pool (the old head); ``grid2``/``grid4``: pooled to 2x2 / 4x4 and
    flattened (``grid4`` is the new default); ``prenorm``: global average pool of the
    bottleneck's last conv before its InstanceNorm; ``groupnorm`` / ``no_norm``: the
    bottleneck block with GroupNorm(8) / without normalisation, then a global average pool.
    """

    def __init__(self, kind: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        grid = {"grid2": 2, "grid4": 4}.get(kind, 1)
        self.unet = UNet(1, 3, features=CPU_FEATURES, global_grid=grid)
        last = getattr(self.unet.encoder, f"down{self.unet.depth}").conv
        width = CPU_FEATURES[-1]
        if kind == "groupnorm":
            last.norm1, last.norm2 = nn.GroupNorm(8, width), nn.GroupNorm(8, width)
        elif kind == "no_norm":
            last.norm1, last.norm2 = nn.Identity(), nn.Identity()
        self.kind = kind
        self._pre: torch.Tensor | None = None
        if kind == "prenorm":
            last.conv2.register_forward_hook(lambda module, args, out: setattr(self, "_pre", out))

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        _, bottleneck = self.unet.encoder(x)
        if self.kind == "prenorm":
            return self._pre.mean(dim=(2, 3))
        return self.unet.global_head.pooled(bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet.global_head.mlp(self.head_input(x))


CANDIDATES = ("gap", "prenorm", "groupnorm", "no_norm", "grid2", "grid4")


def check_head(images: torch.Tensor, steps: int, batch: int, curves: list[str]) -> None:
    g = torch.Generator().manual_seed(123)
    sample = images[torch.randperm(len(images), generator=g)[:256]]
    print(f"\n== defect 2: global head (256 training slices; CPU U-Net {list(CPU_FEATURES)}) ==")
    print(f"{'candidate':10s} {'cos(head input)':>16s} {'cos(head output)':>17s}")
    for kind in CANDIDATES:
        net = HeadCandidate(kind).eval()
        with torch.no_grad():
            h = torch.cat([net.head_input(sample[i:i + 64]) for i in range(0, len(sample), 64)])
            z = net.unet.global_head.mlp(h)
        print(f"{kind:10s} {mean_cosine(h):16.3f} {mean_cosine(z):17.3f}")
    if steps <= 0:
        return
    from medcl.losses import nt_xent

    chance = math.log(2 * batch - 1)
    print(f"\nglobal pretraining, NT-Xent tau 0.5, batch {batch}, medical views; chance ln(2B-1) = {chance:.3f}; "
          f"means of 10 steps:")
    for kind in curves:
        net = HeadCandidate(kind).train()
        params = list(net.unet.encoder.parameters()) + list(net.unet.global_head.parameters())
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
        views = A.make_views("medical")
        gen, picks = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        losses, start = [], time.perf_counter()
        for _ in range(steps):
            v1, v2 = views(images[torch.randint(len(images), (batch,), generator=picks)], generator=gen)
            z1, z2 = net(torch.cat([v1, v2])).chunk(2)
            loss = nt_xent(z1, z2, temperature=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        means = [sum(losses[i:i + 10]) / len(losses[i:i + 10]) for i in range(0, steps, 10)]
        print(f"{kind:10s} " + " ".join(f"{m:.3f}" for m in means) + f"   ({time.perf_counter() - start:.0f} s)")


# --------------------------------------------------------------------------- defect 4
def check_seg_init(dataset: str, fraction: float, seeds: list[int]) -> None:
    import dataclasses

    from medcl.config.pipeline import load_pipeline
    from medcl.data.collate import torch_batches
    from medcl.data.schema import IGNORE_INDEX
    from medcl.data.streams import build_streams
    from medcl.losses import segmentation_loss
    from medcl.runner.session import init_ray
    from medcl.train.context import StageContext
    from medcl.train.driver import STAGES, stage_inputs
    from medcl.train.runtime import seed_everything

    class Streams(StageContext):
        def __init__(self, streams: dict) -> None:
            super().__init__()
            self.streams = streams

        def dataset(self, name):
            return self.streams[name]

        def has_dataset(self, name):
            return name in self.streams

    init_ray(num_cpus=2)
    stage = STAGES["seg_finetune"]
    base = load_pipeline(REPO / "pipelines" / "hippocampus.yaml", smoke=True).stage("finetune")
    print(f"\n== defect 4: segmentation head init ({fraction:.0%} labels; loss = CE + soft Dice on batches of "
          f"{base.batch_size_per_worker} of the labelled slices) ==")
    print(f"{'seed':>4s} {'slices':>6s} {'bg freq':>7s} | {'before: loss':>12s} {'p(bg)':>6s} | "
          f"{'after: loss':>11s} {'p(bg)':>6s}")
    for seed in seeds:
        cfg = dataclasses.replace(base, label_fraction=fraction, seed=seed)
        spec = stage.datasets(cfg, dataset)["train"]
        streams = build_streams({"train": spec})
        ctx = Streams(streams)
        inputs = stage_inputs(cfg, dataset, streams, 1)
        batches = list(torch_batches(streams["train"], cfg.batch_size_per_worker, device="cpu"))
        masks = torch.cat([b["mask"].long() for b in batches])
        bg = float((masks == 0).sum() / (masks != IGNORE_INDEX).sum())
        row = []
        for prepared in (False, True):
            seed_everything(seed, 0)  # as run_loop: seed, then build
            network = stage.build(cfg, inputs)
            if prepared:
                stage.prepare(network, ctx, cfg, inputs)
            network.eval()
            losses, probs = [], []
            with torch.no_grad():
                for b in batches:
                    logits = network(b["image"])
                    losses.append(float(segmentation_loss(logits, b["mask"].long(), ignore_index=IGNORE_INDEX,
                                                          dice_weight=cfg.dice_weight)))
                    probs.append(logits.softmax(1)[:, 0].mean())
            row += [sum(losses) / len(losses), float(torch.stack(probs).mean())]
        print(f"{seed:4d} {len(masks):6d} {bg:7.3f} | {row[0]:12.3f} {row[1]:6.3f} | {row[2]:11.3f} {row[3]:6.3f}")


# --------------------------------------------------------------------------- defect 6
def old_intensity_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``IntensityView`` as it was: brightness, contrast, gamma, noise, clamp."""
    n = len(x)
    fb = A._uniform(n, (0.6, 1.4), x.device, g)
    fc = A._uniform(n, (0.6, 1.4), x.device, g)
    gamma = torch.exp(A._uniform(n, (math.log(0.7), math.log(1.5)), x.device, g))
    std = A._uniform(n, (0.0, 0.03), x.device, g)
    x = A._contrast(A._brightness(x, fb), fc).clamp(min=0) ** gamma.view(n, 1, 1, 1)
    return (x + std.view(n, 1, 1, 1) * A._draw(tuple(x.shape), x.device, g, normal=True)).clamp(0, 1)


def old_brightness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The old views' brightness factor in [0.6, 1.4] alone, clipped at 1 as they were."""
    return A._brightness(x, A._uniform(len(x), (0.6, 1.4), x.device, g)).clamp(0, 1)


def old_medical_intensity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``MedicalView``'s intensity part as it was (strength 0.5, p=0.8): brightness then contrast."""
    n = len(x)
    jit, one = A._coin(n, 0.8, x.device, g), torch.ones(n)
    fb = torch.where(jit, A._uniform(n, (0.6, 1.4), x.device, g), one)
    fc = torch.where(jit, A._uniform(n, (0.6, 1.4), x.device, g), one)
    return A._contrast(A._brightness(x, fb).clamp(0, 1), fc).clamp(0, 1)


def medical_intensity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``MedicalView``'s intensity part as it is: the view with geometry off, each random flip undone."""
    v = A.MedicalView(scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0)(x, g)
    flipped = (v * x.flip(-1)).sum(dim=(1, 2, 3)) > (v * x).sum(dim=(1, 2, 3))  # brighter where x's mirror is
    return torch.where(flipped.view(-1, 1, 1, 1), v.flip(-1), v)


def check_views(images: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(5)
    x = images[torch.randperm(len(images), generator=g)[:128]]
    torch.manual_seed(0)
    net = UNet(1, 3, features=CPU_FEATURES).eval()

    @torch.no_grad()
    def features(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        skips, bottleneck = net.encode(img)
        return net.decode(skips, bottleneck), bottleneck.mean(dim=(2, 3)), net.global_head.pooled(bottleneck)

    def per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(per_sample(a, b).mean())

    one = torch.ones(len(x))
    pairs = {  # name -> () -> the two images of a pair
        "brightness x0.7 (no clipping)": lambda: (x, 0.7 * x),
        "IntensityView before": lambda: (old_intensity_view(x, g), old_intensity_view(x, g)),
        "IntensityView now": lambda: A.make_views("intensity")(x, g),
        "  before, brightness only": lambda: (old_brightness(x, g), old_brightness(x, g)),
        "  now, brightness field only": lambda: A.make_views("intensity", contrast=0.0, gamma=(1.0, 1.0),
                                                               noise_std=(0.0, 0.0))(x, g),
        "  contrast x0.6 (either)": lambda: (x, A._contrast(x, 0.6 * one)),
        "MedicalView intensity before": lambda: (old_medical_intensity(x, g), old_medical_intensity(x, g)),
        "MedicalView intensity now": lambda: (medical_intensity(x, g), medical_intensity(x, g)),
        "MedicalView full pair now": lambda: A.make_views("medical")(x, g),
    }
    print("\n== defect 6: feature change between the two views (mean over 128 slices of |f(a) - f(b)| / |f(b)|; "
          "random-init CPU U-Net) ==")
    print("(unseen: share of pairs whose last decoder map differs by under 2 %)")
    print(f"{'pair':32s} {'input':>6s} {'last decoder map':>17s} {'unseen':>7s} {'head input: GAP':>16s} "
          f"{'grid 4x4':>9s}")
    for name, make in pairs.items():
        a, b = make()
        fa, fb = features(a), features(b)
        unseen = float((per_sample(fa[0], fb[0]) < 0.02).float().mean())
        print(f"{name:32s} {rel(a, b):6.3f} {rel(fa[0], fb[0]):17.3f} {unseen:7.0%} {rel(fa[1], fb[1]):16.3f} "
              f"{rel(fa[2], fb[2]):9.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(REPO / "medcl_data" / "hippocampus64"),
                        help="ingested hippocampus dir at 64x64 (medcl run pipelines/hippocampus.yaml writes it)")
    parser.add_argument("--only", choices=["head", "seg", "views"], action="append",
                        help="run only these checks (repeatable); default all")
    parser.add_argument("--steps", type=int, default=100, help="global pretraining steps per curve (0: none)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--curves", default="gap,grid4", help="candidates with a loss curve, or 'all'")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not Path(args.dataset, "manifest.json").is_file():
        parser.error(f"--dataset {args.dataset}: no manifest.json (ingest Task04_Hippocampus at size 64 first)")
    torch.set_num_threads(args.threads)
    only = set(args.only or ["head", "seg", "views"])
    curves = list(CANDIDATES) if args.curves == "all" else args.curves.split(",")
    bad = [c for c in curves if c not in CANDIDATES]
    if bad:
        parser.error(f"--curves: unknown {bad}; choose from {CANDIDATES} or 'all'")
    print(f"torch {torch.__version__}, dataset {args.dataset}, {time.strftime('%Y-%m-%d')}")
    images = train_images(args.dataset) if only & {"head", "views"} else None
    if "head" in only:
        check_head(images, args.steps, args.batch, curves)
    if "views" in only:
        check_views(images)
    if "seg" in only:
        check_seg_init(str(Path(args.dataset).resolve()), args.fraction, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

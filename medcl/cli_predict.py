"""The ``medcl predict`` verb: an exported model over NIfTI volumes or images, on Ray Data.

:mod:`medcl.cli` adds it with :func:`add_parser`; the work is :func:`medcl.predict.predict`.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

__all__ = ["EXAMPLES", "add_parser", "format_summary"]

EXAMPLES = """examples:
  medcl predict models/hippo-seg Task04_Hippocampus/imagesTs --out predictions/
  medcl predict models/hippo-seg Task04_Hippocampus/imagesTr --out pred/ --labels Task04_Hippocampus/labelsTr
  medcl predict models/pneumonia xrays/ --out pred/ --num-workers 4 --batch-size 128
  medcl predict models/pneumonia images.csv --out pred/ --labels images.csv --label-column label
  medcl predict medcl_runs/quickstart --job "global>finetune@seed=0,fraction=0.25" scans/ --out pred/

writes: <case>.nii.gz masks (the input's affine and header) or <image>.png masks, or predictions.csv
(classification); with --labels also metrics.csv, metrics.json and panel.png"""


def add_parser(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``predict`` to the ``medcl`` subcommands (``add_common``: the -q/-v options every verb has)."""
    parser = sub.add_parser("predict", help="segment or classify new images with an exported model (Ray Data)",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser)
    parser.add_argument("model", metavar="MODEL", help="an export directory (medcl export), a fine-tuning "
                        "checkpoint, or a pipeline's run directory with --job")
    parser.add_argument("input", metavar="INPUT", help="a NIfTI file or folder (e.g. an MSD imagesTs/), a folder "
                        "of PNG/JPEG/TIFF images, or a CSV listing images (--image-column)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--labels", default=None, metavar="PATH", help="score the predictions: a folder of "
                        "label files named as the inputs (e.g. labelsTr/), or for classification a CSV with "
                        "--image-column and --label-column; writes metrics.csv, metrics.json, panel.png")
    parser.add_argument("--job", default=None, metavar="KEY", help="the pipeline job, when MODEL is a run directory")
    parser.add_argument("--image-column", default="image", help="CSV column with image paths (default image)")
    parser.add_argument("--label-column", default="label", help="labels CSV column with class names or indices "
                        "(default label; multi-label: names joined by |)")
    parser.add_argument("--num-workers", type=int, default=1, help="model actors in the Ray Data pool (default 1)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="Ray CPUs (and torch threads) per actor (default 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--batch-size", type=int, default=64, help="images (slices) per model call (default 64)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=_cmd_predict)


def format_summary(summary: dict[str, Any]) -> str:
    """The ``--labels`` summary in a few lines."""

    def num(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    if summary["metric"] == "dice":
        fg = summary["foreground_mean"]
        classes = ", ".join(f"{name} {num(s['mean'])}" for name, s in summary["per_class"].items())
        return (f"Dice over {summary['cases']} case(s): {num(fg['mean'])} ± {num(fg['std'])} (foreground mean); "
                f"per class: {classes}")
    classes = ", ".join(f"{name} {num(v)}" for name, v in summary["per_class"].items())
    return (f"AUC over {summary['cases']} image(s): {num(summary['auc'])}; accuracy {num(summary['accuracy'])}"
            + (f"; per class: {classes}" if classes else ""))


def _cmd_predict(args: argparse.Namespace) -> int:
    from medcl.predict import predict
    result = predict(args.model, args.input, args.out, labels=args.labels, job=args.job,
                     num_workers=args.num_workers, use_gpu=args.use_gpu, batch_size=args.batch_size,
                     cpus_per_worker=args.cpus_per_worker, force=args.force, image_column=args.image_column,
                     label_column=args.label_column, address=args.address,
                     verbose=args.verbose)
    rate = result.images / result.seconds if result.seconds else float("nan")
    print(f"{result.out}: {result.task} of {result.inputs} input(s), {result.images} image(s) in "
          f"{result.seconds:.1f} s ({rate:.0f} images/s)")
    if result.metrics is not None:
        print(format_summary(result.metrics))
    return 0

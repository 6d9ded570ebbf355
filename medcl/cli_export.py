"""The ``medcl export`` verb: a fine-tuned checkpoint, or a pipeline job's, as a self-describing model directory.

:mod:`medcl.cli` adds it with :func:`add_parser`; the work is :func:`medcl.export.export_model`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

__all__ = ["EXAMPLES", "add_parser"]

EXAMPLES = """examples:
  medcl export medcl_runs/seg_finetune-4f0c2a9d1e/checkpoint_000019 --out models/hippo-seg
  medcl export medcl_runs/quickstart --job "global>finetune@seed=0,fraction=0.25" --out models/qs
  medcl export CHECKPOINT --out models/m --weights last --data data/hippocampus --force

load it:  net, card = medcl.export.load_model("models/hippo-seg")"""


def add_parser(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``export`` to the ``medcl`` subcommands (``add_common``: the -q/-v options every verb has)."""
    parser = sub.add_parser("export", help="write a fine-tuned model as safetensors + model.json",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser)
    parser.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="a fine-tuning checkpoint directory, or a pipeline's run directory "
                             "(<storage_path>/<name>, holding checkpoints.json) with --job")
    parser.add_argument("--job", default=None, metavar="KEY", help="the pipeline job to export (a key of "
                        "checkpoints.json)")
    parser.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    parser.add_argument("--weights", choices=("best", "last"), default="best",
                        help="the best validation epoch's weights (default) or the last epoch's")
    parser.add_argument("--data", default=None, metavar="DATASET_DIR",
                        help="the dataset it was trained on (default: the one its run recorded)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from medcl.export import export_job, export_model, load_model
    from medcl.runner.pipeline import CHECKPOINTS_FILE

    options = {"weights": args.weights, "dataset_dir": args.data, "force": args.force}
    if args.job is not None:
        out = export_job(args.source, args.job, args.out, **options)
    elif (Path(args.source) / CHECKPOINTS_FILE).is_file():
        raise ValueError(f"{args.source} is a pipeline's run directory ({CHECKPOINTS_FILE}): name the job to "
                         "export with --job KEY (a key of that file)")
    else:
        out = export_model(args.source, args.out, **options)
    _, card = load_model(out)  # what was written loads
    weights = f"{card.weights['which']} (epoch {card.weights['epoch']})"
    print(f"{out}: {card.task} model, {card.architecture}, {card.in_channels} channel(s) in, {card.num_classes} "
          f"class(es) out, weights {weights}")
    return 0

"""``medcl`` command line: parse, call one library function per verb, print.

Verbs: ingest, pretrain, finetune, run, sweep, report, validate, export (:mod:`medcl.cli_export`).
Errors in user input exit with status 2 and one message naming the file, key or value; runtime
failures (an unreachable MLflow server, a failed wave, a full disk, a NaN loss) with status 1 and one
message; ``--verbose`` adds the traceback. An interruption exits with 130.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

logger = logging.getLogger("medcl")

EXAMPLES = {
    "ingest": """examples:
  medcl ingest synthetic --out data/synth --num-patients 60 --seed 0
  medcl ingest msd ../shared/data/Task04_Hippocampus --size 64 --out data/hippocampus
  medcl ingest medmnist ../shared/data/pneumoniamnist/pneumoniamnist.npz --out data/pneumonia
  medcl ingest folder images.csv --out data/derm --patient-column patient --label-column dx""",
    "pretrain": """examples:
  medcl pretrain --data data/synth --stage global_pretrain --set max_epochs=5 --out runs
  medcl pretrain --data data/hippocampus --stage local_pretrain --set mode=block block_size=16 \\
      label_fraction=0.05 init_from=runs/global/checkpoint --num-workers 2""",
    "finetune": """examples:
  medcl finetune --data data/synth --stage seg_finetune --set label_fraction=0.1 max_epochs=20
  medcl finetune --data data/pneumonia --stage cls_finetune --set protocol=linear init_from=runs/simclr/ckpt""",
    "run": """examples:
  medcl run pipelines/quickstart.yaml
  medcl run pipelines/hippocampus.yaml --smoke
  medcl run pipelines/quickstart.yaml --register quickstart
  medcl run pipelines/hippocampus.yaml --num-workers 4 --use-gpu --set tracking.tracking_uri=http://mlflow:5000""",
    "sweep": """examples:
  medcl sweep tune_spaces/quickstart_temperature.yaml
  medcl sweep tune_spaces/quickstart_temperature.yaml --resume
  medcl sweep tune_spaces/global_asha.yaml --set num_samples=4 name=global-asha-4""",
    "report": """examples:
  medcl report pipelines/quickstart.yaml
  medcl report pipelines/hippocampus.yaml --set name=hippo-r5 --baseline random
  medcl report quickstart --metric test/dice_3d_mean --out report/
  medcl report --experiment medcl-quickstart --pipeline quickstart --tracking-uri sqlite:///mlflow.db""",
    "validate": """examples:
  medcl validate pipelines/hippocampus.yaml
  medcl validate tune_spaces/local_block.yaml""",
}


class UserError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s" if not args.verbose else
                        "%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    from medcl.runner.session import quiet_ray_logging

    quiet_ray_logging(args.verbose)


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final result")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logs, Ray and MLflow logs included")


def _add_scaling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers per stage (default 1)")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, bf16 autocast")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")


def _parse_option_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


# ----------------------------------------------------------------------------- ingest
def _ingest_parser(sub: argparse._SubParsersAction) -> None:
    from medcl.data.ingest import SOURCE_KINDS, ingest_option_help, ingest_options

    parser = sub.add_parser("ingest", help="turn a data source into Parquet shards",
                            epilog=EXAMPLES["ingest"], formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="source_kind", required=True, metavar="SOURCE")
    for kind in SOURCE_KINDS:
        p = kinds.add_parser(kind, help=f"ingest a {kind} source", epilog=EXAMPLES["ingest"],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(p)
        if kind != "synthetic":
            p.add_argument("source", help="task folder, .npz file or CSV")
        p.add_argument("--out", required=True, help="dataset directory to write")
        p.add_argument("--force", action="store_true", help="rebuild even if up to date")
        helps = ingest_option_help(kind)
        for name, default in ingest_options(kind).items():
            flag = "--" + name.replace("_", "-")
            p.add_argument(flag, dest=f"opt_{name}", type=_parse_option_value, default=None, metavar=name.upper(),
                           help=f"{helps[name]} (default: {default!r})".replace("%", "%%").lstrip())
        p.set_defaults(func=_cmd_ingest)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from medcl.data.ingest import ingest

    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    manifest = ingest(args.source_kind, getattr(args, "source", None), args.out, options, force=args.force)
    splits = ", ".join(f"{k}: {v}" for k, v in (manifest.splits or {}).items())
    print(f"{args.out}: {manifest.num_patients} patients, {manifest.num_images} images "
          f"[{splits}], image shape {list(manifest.image_shape)}")
    return 0


# ----------------------------------------------------------------------------- stages
def _stage_parser(sub: argparse._SubParsersAction, verb: str, kinds: Sequence[str]) -> None:
    parser = sub.add_parser(verb, help=f"run one {verb} stage on Ray Train", epilog=EXAMPLES[verb],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser)
    parser.add_argument("--data", required=True, help="dataset directory (from medcl ingest)")
    parser.add_argument("--stage", required=True, choices=kinds)
    parser.add_argument("--config", default=None, help="YAML file with the stage's keys")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override stage keys")
    parser.add_argument("--out", default="medcl_runs", help="storage path for checkpoints (default medcl_runs)")
    parser.add_argument("--name", default=None,
                        help="run name; the same name resumes, with the same settings only "
                             "(default: <stage>-<hash of the settings and the dataset>)")
    parser.add_argument("--smoke-test", action="store_true", help="one epoch, tiny batches")
    _add_scaling(parser)
    parser.set_defaults(func=_cmd_stage)


def _cmd_stage(args: argparse.Namespace) -> int:
    from medcl.config.binder import apply_overrides, load_yaml
    from medcl.config.stages import ScalingSpec, stage_config_from_dict
    from medcl.runner.lock import run_lock
    from medcl.runner.session import init_ray
    from medcl.storage import resolve_storage
    from medcl.train.driver import run_stage
    from medcl.train.run_record import check_stage_resumable, stage_run_name

    data = load_yaml(args.config) if args.config else {}
    data["kind"] = args.stage
    if args.smoke_test:
        data.update(max_epochs=1, batch_size_per_worker=min(int(data.get("batch_size_per_worker", 4)), 4))
    data = apply_overrides(data, args.set)
    cfg = stage_config_from_dict(data, source=args.config or "--set")
    scaling = ScalingSpec(num_workers=args.num_workers or 1, use_gpu=bool(args.use_gpu))
    if not (Path(args.data) / "manifest.json").is_file():
        raise UserError(f"--data: no medcl dataset at {args.data} (manifest.json missing); "
                        "make one with `medcl ingest`")
    name = args.name or stage_run_name(cfg, args.data)
    with run_lock(f"{resolve_storage(args.out)}/{name}", f"stage run {name!r}"):  # one run per name at a time
        resuming = check_stage_resumable(cfg, args.data, args.out, name)  # other settings under this name: exit 2
        logger.info("%s stage run %s in %s", "resuming" if resuming else "starting", name, args.out)
        init_ray(args.address, verbose=args.verbose)
        result = run_stage(cfg, args.data, scaling=scaling, storage_path=args.out, name=name)
    print(json.dumps({"checkpoint": result.checkpoint, "metrics": result.metrics}, indent=2, default=float))
    return 0


# ----------------------------------------------------------------------------- run
def _run_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("run", help="run a pipeline file: every method × label fraction × seed",
                            epilog=EXAMPLES["run"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser)
    parser.add_argument("pipeline", help="pipelines/*.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override pipeline keys")
    parser.add_argument("--smoke", action="store_true", help="apply the file's `smoke:` overrides (short CPU run)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="run only these methods of the file (default: all)")
    parser.add_argument("--register", default=None, metavar="NAME", help="then register the best job by validation "
                        "of each method x fraction in the MLflow Model Registry as NAME-<method>-<fraction>")
    _add_scaling(parser)
    parser.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from medcl.config.pipeline import load_pipeline, with_scaling
    from medcl.runner.pipeline import jobs_left, run_pipeline
    from medcl.runner.plan import check_resumable
    from medcl.runner.progress import ProgressCallback
    from medcl.runner.session import init_ray

    cfg = load_pipeline(args.pipeline, overrides=args.set, smoke=args.smoke, methods=args.methods)
    cfg = with_scaling(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu)
    check_resumable(cfg)
    from medcl.cli_register import model_hook, print_registered, registry_target

    target = registry_target(cfg, args.register)  # a store that cannot register fails before training
    init_ray(args.address, verbose=args.verbose)
    progress = ProgressCallback(quiet=args.quiet, total=jobs_left(cfg))  # a resumed run counts what is left
    result = run_pipeline(cfg, config_text=Path(args.pipeline).read_text(), callbacks=[progress],
                          after_wave=model_hook(args.register))  # each fine-tune's MLflow model
    _print_result(result, cfg.metric)
    print_registered(target, result.parent_run_id, args.register)  # --register NAME; nothing without it
    return 0


def _print_result(result: Any, metric: str) -> None:
    from medcl.cli_register import print_ui_links
    from medcl.report import format_table

    if result.table is not None:
        print(f"\nlabel efficiency: {metric} (mean ± std over seeds)")
        print(format_table(result.table))
    if result.png_path:
        print(f"\ncurve: {result.png_path}\ntable: {result.csv_path}")
    print(f"MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    print_ui_links(result)  # direct links into the MLflow UI


# ----------------------------------------------------------------------------- sweep
def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sweep", help="Ray Tune sweep over a search space file", epilog=EXAMPLES["sweep"],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser)
    parser.add_argument("space", help="tune_spaces/*.yaml")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override sweep keys")
    _add_scaling(parser)
    parser.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from medcl.config.sweep import load_sweep
    from medcl.runner.progress import ProgressCallback
    from medcl.runner.session import init_ray
    from medcl.runner.sweep import run_sweep

    sweep = load_sweep(args.space, overrides=args.set)
    init_ray(args.address, verbose=args.verbose)
    result = run_sweep(sweep, resume=args.resume, callbacks=[ProgressCallback(quiet=args.quiet)],
                       num_workers=args.num_workers, use_gpu=args.use_gpu)
    print(result.summary())
    return 1 if result.unfinished else 0


# ----------------------------------------------------------------------------- report
def _report_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="label-efficiency curve and table from MLflow runs",
                            epilog=EXAMPLES["report"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser)
    parser.add_argument("pipeline_ref", nargs="?", default=None, metavar="PIPELINE",
                        help="the pipeline file that ran (pipelines/*.yaml: its name, experiment, store and "
                             "metric are used) or the pipeline's name (its experiment is looked up)")
    parser.add_argument("--pipeline", default=None, help="pipeline (parent run) name, instead of PIPELINE")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="the overrides the pipeline ran with that change its name or tracking "
                             "(e.g. name=hippo-r5)")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (default: the pipeline file's, else the one experiment "
                             "holding a pipeline run of that name)")
    parser.add_argument("--metric", default=None, help="metric to plot (default: the pipeline file's, else test/dice_2d)")
    parser.add_argument("--out", default="report", help="directory for the CSV and PNG")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store or server (default: the pipeline file's, else MLFLOW_TRACKING_URI, "
                             "else ./mlflow.db); nothing is created in it")
    parser.add_argument("--baseline", default=None, metavar="METHOD",
                        help="also print each method's paired difference to METHOD per seed (e.g. random), "
                             "with a 95%% bootstrap interval, and write it as a CSV")
    parser.set_defaults(func=_cmd_report)


def _report_source(args: argparse.Namespace) -> tuple[str, str | None, str | None, str, str]:
    """(pipeline name, experiment or None, tracking URI or None, store workdir, default metric) for ``report``."""
    from medcl.config.pipeline import read_pipeline_identity

    ref = args.pipeline_ref
    if (ref is None) == (args.pipeline is None):
        raise UserError("report: give the pipeline file or name (PIPELINE), or --pipeline NAME, not both")
    if ref is not None and Path(ref).suffix in (".yaml", ".yml"):
        name, experiment, uri, workdir, metric = read_pipeline_identity(ref, args.set)
    elif args.set:
        raise UserError("report: --set applies to a pipeline file; give the file as PIPELINE")
    else:
        name, experiment, uri, workdir, metric = args.pipeline or ref, None, None, ".", "test/dice_2d"
    return name, args.experiment or experiment, args.tracking_uri or uri, workdir, metric


def _cmd_report(args: argparse.Namespace) -> int:
    from medcl import tracking as mlt
    from medcl.report import format_paired, format_table, write_paired_report, write_report

    name, experiment, uri, workdir, metric = _report_source(args)
    args.metric = args.metric or metric
    uri = mlt.existing_store_uri(uri, workdir)  # read-only: no database or experiment is created
    if experiment is None:
        found = mlt.experiments_with_pipeline(uri, name)
        if len(found) != 1:
            where = f"experiments {', '.join(map(repr, found))}" if found else "no experiment"
            raise UserError(f"pipeline run {name!r}: found in {where} of {uri}; name one with --experiment")
        experiment = found[0]
    target = mlt.open_tracking(uri, experiment)
    parent = mlt.find_parent_run(target, name)
    if parent is None:
        raise UserError(f"no pipeline run named {name!r} in MLflow experiment {experiment!r} of {uri}")
    # A pipeline's curve is drawn from its final jobs (the fine-tuning run that ends each method).
    role = mlt.run_role(target, parent)
    only_final = "tags.`medcl.role` = 'final'" if role == "pipeline" else None
    csv_path, png_path, table = write_report(target, parent, args.metric, args.out, filter=only_final)
    print(format_table(table))
    if args.baseline is not None:
        try:
            paired_path, paired = write_paired_report(target, parent, args.metric, args.baseline, args.out,
                                                      filter=only_final)
        except ValueError as exc:
            raise UserError(f"--baseline: {exc}") from None
        print("\n" + format_paired(paired, args.baseline))
    print(f"\ncurve: {png_path}\ntable: {csv_path}" + (f"\npaired: {paired_path}" if args.baseline is not None else ""))
    return 0


# ----------------------------------------------------------------------------- validate
def _validate_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("validate", help="check a pipeline or search-space file without running it",
                            epilog=EXAMPLES["validate"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser)
    parser.add_argument("file")
    parser.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from medcl.config.binder import load_yaml

    data = load_yaml(args.file, problems=[])  # duplicate keys are reported with the file's other problems
    if "space" in data:
        from medcl.config.sweep import load_sweep

        load_sweep(args.file)
    else:
        from medcl.config.pipeline import load_pipeline
        from medcl.runner.plan import plan_jobs

        cfg = load_pipeline(args.file)
        print(f"{args.file}: valid; {len(plan_jobs(cfg))} stage jobs")
        return 0
    print(f"{args.file}: valid")
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from medcl import __version__
    from medcl import cli_export, cli_predict

    parser = argparse.ArgumentParser(
        prog="medcl",
        description="Label-efficient medical image analysis with contrastive learning, on Ray.",
        epilog="Run `medcl VERB --help` for each verb's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"medcl {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _ingest_parser(sub)
    _stage_parser(sub, "pretrain", ["global_pretrain", "local_pretrain", "cls_pretrain"])
    _stage_parser(sub, "finetune", ["seg_finetune", "cls_finetune"])
    _run_parser(sub)
    _sweep_parser(sub)
    _report_parser(sub)
    _validate_parser(sub)
    for module in (cli_export, cli_predict):
        module.add_parser(sub, _add_common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medcl`` console script; returns the exit status."""
    from medcl.config.binder import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError, ValueError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        print(f"medcl {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "the same command with --resume" if args.verb == "sweep" else "the same command again"
        print(f"medcl {args.verb}: interrupted; run {again} to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a runtime failure (MLflow unreachable, failed wave, full disk, NaN loss): exit 1
        from medcl.runner.failures import describe_error

        if args.verbose:
            traceback.print_exc()
        print(f"medcl {args.verb}: error: {describe_error(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

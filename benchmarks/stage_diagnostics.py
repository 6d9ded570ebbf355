"""What each stage of a pipeline run saw and changed, read back from MLflow.

Per stage kind (and local mode): the training loss at the first and last epoch
next to its chance level (contrastive stages), the relative weight change of the
parts it hands over after its last epoch, skipped steps, and for fine-tuning the
epoch validation picked. Medians over the runs of each kind, with min and max.

    python benchmarks/stage_diagnostics.py --tracking-uri sqlite:///mlflow.db \\
        --experiment medcl-hippocampus --pipeline hippo-r4
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys


def _chance(params: dict) -> float | None:
    """NT-Xent / local loss at chance: log of the number of candidates an anchor is compared with."""
    kind = params.get("kind")
    batch = int(params.get("batch_size_per_worker", 0) or 0)
    if kind == "global_pretrain" and params.get("positives", "simclr") in ("simclr", "micle") and batch > 0:
        return math.log(2 * batch - 1)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--pipeline", required=True, help="parent run name")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from medcl import tracking

    target = tracking.configure_tracking(tracking_uri=args.tracking_uri, experiment=args.experiment, workdir=".")
    parent = tracking.find_parent_run(target, args.pipeline)
    if parent is None:
        print(f"no pipeline run {args.pipeline!r}", file=sys.stderr)
        return 2
    runs = tracking.search_runs(target, parent_run_id=parent, filter="attributes.status = 'FINISHED'")
    client = MlflowClient(args.tracking_uri)
    groups: dict[str, list[dict]] = {}
    for _, run in runs.iterrows():
        params = {k[7:]: v for k, v in run.items() if k.startswith("params.") and isinstance(v, str)}
        params.update({k[7:]: v for k, v in params.items() if k.startswith("config.")})  # the stage's settings
        kind = params.get("kind", "?")
        label = kind + (f" {params.get('loss')}/{params.get('mode')}" if kind == "local_pretrain" else "")
        if params.get("label_fraction") and kind != "global_pretrain":
            label += f" @ {float(params['label_fraction']):g}"
        losses = [m.value for m in sorted(client.get_metric_history(run["run_id"], "train/loss"), key=lambda m: m.step)]
        row = {"first": losses[0] if losses else math.nan, "last": losses[-1] if losses else math.nan,
               "chance": _chance(params)}
        for key in ("train/weight_change/encoder", "train/weight_change/decoder", "train/skipped_steps",
                    "best/epoch", "train/steps"):
            value = run.get(f"metrics.{key}")
            row[key] = float(value) if value is not None and not (isinstance(value, float) and math.isnan(value)) else None
        skipped = [m.value for m in client.get_metric_history(run["run_id"], "train/skipped_steps")]
        row["skipped_total"] = sum(skipped) if skipped else None
        groups.setdefault(label, []).append(row)

    def summary(values: list[float | None]) -> str:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return "-"
        return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    print(f"{args.pipeline}: medians over runs [min, max]")
    for label, rows in sorted(groups.items()):
        chance = rows[0]["chance"]
        print(f"\n{label} ({len(rows)} runs)")
        print(f"  train/loss first epoch {summary([r['first'] for r in rows])}, last {summary([r['last'] for r in rows])}"
              + (f", chance {chance:.3f}" if chance else ""))
        for key in ("train/weight_change/encoder", "train/weight_change/decoder"):
            if any(r[key] is not None for r in rows):
                print(f"  {key} after the last epoch {summary([r[key] for r in rows])}")
        if any(r["skipped_total"] for r in rows):
            print(f"  skipped steps (whole stage) {summary([r['skipped_total'] for r in rows])}")
        if any(r["best/epoch"] is not None for r in rows):
            epochs = [int(r["best/epoch"]) for r in rows if r["best/epoch"] is not None]
            print("  best-validation epoch: " + ", ".join(f"{e}: {epochs.count(e)}" for e in sorted(set(epochs))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

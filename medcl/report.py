"""Label-efficiency reports: metric vs labelled fraction, one line per method.

Reads finished child runs back from MLflow (never private files), aggregates
the chosen metric over seeds (mean, sample std, n) per method x fraction, and
writes a CSV table plus a PNG curve, both also logged on the parent run.

Table layout (the contract between the functions here): columns
``[*group_by, fraction_key, "mean", "std", "n"]`` sorted by group then fraction;
``std`` is the sample standard deviation (ddof=1), NaN when ``n == 1``.

Example:
    >>> csv_path, png_path, table = write_report(target, parent_id, "test/dice", "reports")  # doctest: +SKIP
    >>> print(format_table(table))  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medcl import tracking
from medcl.storage import atomic_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["format_table", "label_efficiency_table", "plot_label_efficiency", "write_report", "paired_differences",
           "format_paired", "write_paired_report"]

logger = logging.getLogger(__name__)

_STATS = ("mean", "std", "n")


def _resolve(df: pd.DataFrame, key: str, prefixes: Sequence[str], what: str) -> str:
    """Column of ``key``: itself, else ``<prefix>.<key>`` for the first prefix present."""
    for column in (key, *(f"{p}.{key}" for p in prefixes)):
        if column in df.columns:
            return column
    known = sorted(c for c in df.columns if c.startswith(tuple(f"{p}." for p in prefixes)))
    raise ValueError(f"{what} {key!r} not found in the runs (looked for {key!r} and "
                     f"{', '.join(f'{p}.{key}' for p in prefixes)}); available: {known}")


def label_efficiency_table(
    runs_df: pd.DataFrame,
    metric: str,
    group_by: Sequence[str] | str = ("method",),
    fraction_key: str = "label_fraction",
) -> pd.DataFrame:
    """Aggregate ``metric`` over seeds per group x labelled fraction.

    Args:
        runs_df: One row per run, as :func:`medcl.tracking.search_runs` returns
            (``params.*``/``tags.*``/``metrics.*`` columns; bare names also accepted).
        metric: Metric name (``metrics.<metric>`` column).
        group_by: Param/tag names whose values identify a line (e.g. the method).
        fraction_key: Param/tag holding the labelled fraction (strings are cast to float).

    Returns:
        DataFrame ``[*group_by, fraction_key, "mean", "std", "n"]``; runs without the metric are dropped.

    Raises:
        ValueError: A column is missing, a fraction is not a positive number, or no run has the metric.
    """
    import pandas as pd

    group_by = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    if fraction_key in group_by:
        raise ValueError(f"fraction_key {fraction_key!r} must not also be in group_by={group_by}")
    metric_col = _resolve(runs_df, metric, ("metrics",), "metric")
    group_cols = [_resolve(runs_df, g, ("params", "tags"), "group_by key") for g in group_by]
    frac_col = _resolve(runs_df, fraction_key, ("params", "tags"), "fraction_key")

    values = pd.to_numeric(runs_df[metric_col], errors="coerce")
    missing = int(values.isna().sum())
    if missing:
        logger.info("%d of %d runs have no %r and are left out", missing, len(runs_df), metric)
    df = runs_df.loc[values.notna()]
    if df.empty:
        raise ValueError(f"no run has a value for metric {metric!r}")
    fractions = pd.to_numeric(df[frac_col], errors="coerce")
    bad = ~(fractions > 0) | ~fractions.map(math.isfinite)
    if bad.any():
        ids = df["run_id"][bad].tolist() if "run_id" in df.columns else df.index[bad].tolist()
        raise ValueError(f"{fraction_key} must be a positive number; got "
                         f"{df[frac_col][bad].tolist()} in runs {ids}")
    data = pd.DataFrame(index=df.index)
    for g, c in zip(group_by, group_cols):
        data[g] = df[c].astype(str)
    data[fraction_key] = fractions.astype(float)
    data["value"] = values[values.notna()].astype(float)
    keys = [*group_by, fraction_key]
    table = data.groupby(keys, sort=True)["value"].agg(["mean", "std", "count"]).reset_index()
    table = table.rename(columns={"count": "n"})
    table["n"] = table["n"].astype(int)
    return table[[*keys, *_STATS]]


def paired_differences(
    runs_df: pd.DataFrame,
    metric: str,
    baseline: str,
    group_by: str = "method",
    fraction_key: str = "label_fraction",
    pair_key: str = "seed",
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """Per method x fraction: the mean over seeds of ``metric - metric(baseline)``, with a bootstrap interval.

    Runs are paired by ``pair_key`` (the seed: same labelled subset and same
    initialisation of the parts a method does not pretrain) at each fraction; a
    run without a partner is left out (logged). The interval is the percentile
    bootstrap of the mean difference: ``n_boot`` resamples of the n paired
    differences with replacement (seeded by ``rng_seed``), their
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.

    Returns:
        DataFrame ``[group_by, fraction_key, "mean_diff", "ci_low", "ci_high", "n", "wins", "diffs"]``
        (``wins``: pairs where the method beats the baseline; ``diffs``: the paired differences by seed),
        the baseline's own rows excluded.

    Raises:
        ValueError: a column is missing, or ``baseline`` names no method of the runs.
    """
    import numpy as np
    import pandas as pd

    metric_col = _resolve(runs_df, metric, ("metrics",), "metric")
    method_col = _resolve(runs_df, group_by, ("params", "tags"), "group_by key")
    frac_col = _resolve(runs_df, fraction_key, ("params", "tags"), "fraction_key")
    pair_col = _resolve(runs_df, pair_key, ("params", "tags"), "pair_key")
    data = pd.DataFrame({"method": runs_df[method_col],
                         "fraction": pd.to_numeric(runs_df[frac_col], errors="coerce"),
                         "pair": runs_df[pair_col],
                         "value": pd.to_numeric(runs_df[metric_col], errors="coerce")}).dropna()
    data["method"], data["pair"] = data["method"].astype(str), data["pair"].astype(str)
    if baseline not in set(data["method"]):
        raise ValueError(f"baseline {baseline!r} is not a {group_by} of the runs; they have "
                         f"{sorted(set(data['method']))}")
    base = data[data["method"] == baseline].groupby(["fraction", "pair"])["value"].mean()  # a re-run: its mean
    rng = np.random.default_rng(rng_seed)
    rows = []
    for (method, fraction), group in data[data["method"] != baseline].groupby(["method", "fraction"], sort=True):
        paired = [(p, v - base[(fraction, p)]) for p, v in zip(group["pair"], group["value"]) if (fraction, p) in base]
        if len(paired) < len(group):
            logger.info("%s at %g: %d runs have no %s partner and are left out", method, fraction,
                        len(group) - len(paired), baseline)
        if not paired:
            continue
        diffs = np.array([d for _, d in sorted(paired)])
        means = diffs[rng.integers(0, len(diffs), size=(n_boot, len(diffs)))].mean(axis=1)
        low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
        rows.append({group_by: method, fraction_key: float(fraction), "mean_diff": float(diffs.mean()),
                     "ci_low": float(low), "ci_high": float(high), "n": len(diffs),
                     "wins": int((diffs > 0).sum()), "diffs": " ".join(f"{d:+.3f}" for d in diffs)})
    return pd.DataFrame(rows, columns=[group_by, fraction_key, "mean_diff", "ci_low", "ci_high", "n", "wins",
                                       "diffs"])


def format_paired(table: pd.DataFrame, baseline: str, digits: int = 3) -> str:
    """Render :func:`paired_differences` for a terminal: ``+0.052 [+0.031, +0.074]  5/5``."""
    lines = [f"paired difference to {baseline} (mean over seeds [95% bootstrap interval], wins/pairs):"]
    for rec in table.to_dict("records"):
        method, fraction = rec[table.columns[0]], rec[table.columns[1]]
        lines.append(f"  {method}  {100 * fraction:g}%  {rec['mean_diff']:+.{digits}f} "
                     f"[{rec['ci_low']:+.{digits}f}, {rec['ci_high']:+.{digits}f}]  {rec['wins']}/{rec['n']}")
    return "\n".join(lines)


def _split_columns(table: pd.DataFrame) -> tuple[list[str], str]:
    cols = list(table.columns)
    if cols[-3:] != list(_STATS) or len(cols) < 4:
        raise ValueError(f"table must have columns [*group_by, fraction, 'mean', 'std', 'n'], got {cols}")
    return cols[:-4], cols[-4]


def plot_label_efficiency(table: pd.DataFrame, metric: str, path: str | os.PathLike[str]) -> Path:
    """Draw the label-efficiency curve as a PNG (atomic write).

    One line per group with markers at the measured fractions, a shaded
    mean +- std band, x = labelled fraction in percent (log scale when the
    fractions span more than 10x).

    Args:
        table: Output of :func:`label_efficiency_table`.
        metric: Metric name for the axis label and title.
        path: Output ``.png`` file.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``table`` is empty or lacks the layout, or ``path`` is not a ``.png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, PercentFormatter

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    groups, frac = _split_columns(table)
    if table.empty:
        raise ValueError("table is empty: nothing to plot")
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    grouped = table.groupby(groups, sort=True) if groups else [((), table)]
    for key, part in grouped:
        part = part.sort_values(frac)
        key = key if isinstance(key, tuple) else (key,)
        label = " / ".join(map(str, key)) or "all runs"
        x, mean, std = part[frac].to_numpy(float), part["mean"].to_numpy(float), part["std"].fillna(0.0).to_numpy(float)
        (line,) = ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    fractions = sorted(table[frac].unique())
    if fractions[-1] / fractions[0] > 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(fractions)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))
    ax.set_xlabel("labelled fraction of training subjects")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs labelled fraction (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(title=", ".join(groups) or None)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_report(
    target: tracking.TrackingTarget,
    parent_run_id: str,
    metric: str,
    out_dir: str | os.PathLike[str],
    *,
    group_by: Sequence[str] | str = ("method",),
    fraction_key: str = "label_fraction",
    filter: str | None = None,
) -> tuple[Path, Path, pd.DataFrame]:
    """Build the label-efficiency report of a sweep from its FINISHED child runs.

    Writes ``label_efficiency_<metric>.csv`` and ``.png`` into ``out_dir`` and logs
    both on the parent run under ``report/``. Children without ``metric`` (e.g.
    pretraining jobs) are left out; ``filter`` narrows further with an MLflow
    filter string, e.g. ``"tags.`medcl.role` = 'final'"``.

    Returns:
        ``(csv_path, png_path, table)``.

    Raises:
        ValueError: No finished child run under ``parent_run_id``, or see :func:`label_efficiency_table`.
    """
    clauses = ["attributes.status = 'FINISHED'", *([filter] if filter else [])]
    runs = tracking.search_runs(target, parent_run_id=parent_run_id, filter=" and ".join(clauses))
    if runs.empty:
        raise ValueError(f"no FINISHED child runs under parent_run_id={parent_run_id!r} in {target.tracking_uri}")
    table = label_efficiency_table(runs, metric, group_by=group_by, fraction_key=fraction_key)
    out_dir = Path(out_dir)
    stem = "label_efficiency_" + (re.sub(r"[^\w.\-]+", "_", metric).strip("._") or "metric")
    csv_path, png_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.png"
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    plot_label_efficiency(table, metric, png_path)
    run = tracking.RunLogger(target, parent_run_id)
    run.log_artifact(csv_path, artifact_path="report")
    run.log_artifact(png_path, artifact_path="report")
    logger.info("label-efficiency report for %s: %s, %s", parent_run_id, csv_path, png_path)
    return csv_path, png_path, table


def write_paired_report(target: tracking.TrackingTarget, parent_run_id: str, metric: str, baseline: str,
                        out_dir: str | os.PathLike[str], *, filter: str | None = None) -> tuple[Path, pd.DataFrame]:
    """:func:`paired_differences` of a sweep's FINISHED child runs, written to ``paired_<metric>_vs_<baseline>.csv``.

    Returns:
        ``(csv_path, table)``.
    """
    clauses = ["attributes.status = 'FINISHED'", *([filter] if filter else [])]
    runs = tracking.search_runs(target, parent_run_id=parent_run_id, filter=" and ".join(clauses))
    if runs.empty:
        raise ValueError(f"no FINISHED child runs under parent_run_id={parent_run_id!r} in {target.tracking_uri}")
    table = paired_differences(runs, metric, baseline)
    stem = re.sub(r"[^\w.\-]+", "_", f"paired_{metric}_vs_{baseline}").strip("._")
    csv_path = Path(out_dir) / f"{stem}.csv"
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    return csv_path, table


def format_table(table: pd.DataFrame, digits: int = 3) -> str:
    """Render the table for a terminal: group columns, fraction in %, ``mean ± std``, n."""
    groups, frac = _split_columns(table)
    header = [*groups, frac, "mean ± std", "n"]
    rows = []
    for rec in table.itertuples(index=False):
        r = dict(zip(table.columns, rec))
        spread = "n/a" if math.isnan(r["std"]) else f"{r['std']:.{digits}f}"
        rows.append([*(str(r[g]) for g in groups), f"{100 * r[frac]:g}%",
                     f"{r['mean']:.{digits}f} ± {spread}", str(r["n"])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)

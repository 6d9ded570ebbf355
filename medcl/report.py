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

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medcl import tracking

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["format_table", "label_efficiency_table", "plot_label_efficiency", "write_report"]

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


def _split_columns(table: pd.DataFrame) -> tuple[list[str], str]:
    cols = list(table.columns)
    if cols[-3:] != list(_STATS) or len(cols) < 4:
        raise ValueError(f"table must have columns [*group_by, fraction, 'mean', 'std', 'n'], got {cols}")
    return cols[:-4], cols[-4]


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    with _atomic_path(path) as tmp:
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
    with _atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    plot_label_efficiency(table, metric, png_path)
    run = tracking.RunLogger(target, parent_run_id)
    run.log_artifact(csv_path, artifact_path="report")
    run.log_artifact(png_path, artifact_path="report")
    logger.info("label-efficiency report for %s: %s, %s", parent_run_id, csv_path, png_path)
    return csv_path, png_path, table


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

"""Direct links into the MLflow UI for a pipeline's runs (what ``medcl run`` prints at the end).

MLflow 3.17's UI opens an experiment on its GenAI "Overview" of traces, which is empty for
medcl; these links go straight to the runs table (``#/experiments/<id>/runs``), the parent
run (``.../runs/<run id>``) and its label-efficiency curve (``.../runs/<run id>/artifacts/<path>``).
A server's links use its own address; a local store (``sqlite:///...``) needs ``mlflow ui``
started on it first, so the command comes with the links (port 5000, MLflow's default).

Example:
    >>> print(format_run_links(run_links("sqlite:////w/mlflow.db", "1", "abc", "report/curve.png")))
    MLflow UI: start it with `mlflow ui --backend-store-uri sqlite:////w/mlflow.db --port 5000`, then open
      runs:   http://127.0.0.1:5000/#/experiments/1/runs
      parent: http://127.0.0.1:5000/#/experiments/1/runs/abc
      curve:  http://127.0.0.1:5000/#/experiments/1/runs/abc/artifacts/report/curve.png
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import quote

from medcl.tracking.store import client_for

__all__ = ["RunLinks", "format_run_links", "pipeline_links", "run_links"]

DEFAULT_UI_PORT = 5000


@dataclass(frozen=True)
class RunLinks:
    """Where a pipeline's runs are in the MLflow UI.

    Attributes:
        ui: The UI's address (the server itself, or ``http://127.0.0.1:<port>`` for ``mlflow ui``).
        command: The ``mlflow ui`` command to start first (local stores), or None (a server).
        runs: The experiment's runs table.
        parent: The parent run's page.
        curve: The curve artifact's page on the parent run, or None.
    """

    ui: str
    command: str | None
    runs: str
    parent: str
    curve: str | None


def run_links(tracking_uri: str, experiment_id: str, run_id: str, curve_artifact: str | None = None, *,
              port: int = DEFAULT_UI_PORT) -> RunLinks:
    """The :class:`RunLinks` of run ``run_id`` of experiment ``experiment_id`` in store ``tracking_uri``.

    Args:
        tracking_uri: An ``http(s)://`` server (its UI is at the same address) or a database URI
            (``sqlite:///...``: served by ``mlflow ui --backend-store-uri <uri> --port <port>``).
        experiment_id: The run's experiment.
        run_id: The parent run.
        curve_artifact: Artifact path of the curve on that run (``report/label_efficiency_test_dice_2d.png``).
        port: The port of ``mlflow ui`` for a local store.
    """
    if tracking_uri.startswith(("http://", "https://")):
        ui, command = tracking_uri.rstrip("/"), None
    else:
        ui = f"http://127.0.0.1:{port}"
        command = f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port {port}"
    runs = f"{ui}/#/experiments/{quote(str(experiment_id), safe='')}/runs"
    parent = f"{runs}/{quote(run_id, safe='')}"
    curve = f"{parent}/artifacts/{quote(curve_artifact.strip('/'), safe='/')}" if curve_artifact else None
    return RunLinks(ui=ui, command=command, runs=runs, parent=parent, curve=curve)


def pipeline_links(tracking_uri: str, run_id: str, curve_artifact: str | None = None, *,
                   port: int = DEFAULT_UI_PORT) -> RunLinks:
    """:func:`run_links` of an existing run, its experiment looked up in the store."""
    experiment_id = client_for(tracking_uri).get_run(run_id).info.experiment_id
    return run_links(tracking_uri, experiment_id, run_id, curve_artifact, port=port)


def format_run_links(links: RunLinks) -> str:
    """The links as printed after a pipeline: the ``mlflow ui`` command first when one is needed."""
    head = (f"MLflow UI: start it with `{links.command}`, then open" if links.command
            else f"MLflow UI ({links.ui}):")
    lines = [head, f"  runs:   {links.runs}", f"  parent: {links.parent}"]
    if links.curve:
        lines.append(f"  curve:  {links.curve}")
    return "\n".join(lines)

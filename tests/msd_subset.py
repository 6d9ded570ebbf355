"""A Decathlon task folder listing a few real cases (files copied: a symlink out of the folder is refused)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_msd_subset(task: Path, root: Path, cases: list[str]) -> Path:
    """Write ``root`` as a task folder holding ``cases`` of ``task`` (their image and label, and a dataset.json)."""
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    meta["numTraining"] = len(cases)
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
        for c in cases:
            shutil.copyfile(task / d / f"{c}.nii.gz", root / d / f"{c}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(meta))
    return root

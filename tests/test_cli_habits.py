"""CLI habits (issue 16, item 6): ingest options carry their docstring help; list values as ``a,b,c``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcl.cli import main
from medcl.config.pipeline import load_pipeline
from medcl.config.stages import stage_config_from_dict
from medcl.data.ingest import SOURCE_KINDS, ingest_options

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "pipelines" / "quickstart.yaml"


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # --help and argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _option_help(out: str, flag: str) -> str:
    """The help text argparse printed for ``flag`` (its line and continuation lines), whitespace folded."""
    lines = out.split("examples:", 1)[0].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
    text = [lines[start].strip()[len(flag):]]
    for line in lines[start + 1:]:
        if line.strip().startswith("-") or not line.startswith(" " * 10):
            break
        text.append(line.strip())
    return " ".join(" ".join(text).split())


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_ingest_option_has_help_beyond_its_default(kind, capsys):
    code, out, _ = _run(["ingest", kind, "--help"], capsys)
    assert code == 0
    for name in ingest_options(kind):
        flag = "--" + name.replace("_", "-")
        text = _option_help(out, flag)
        words = text.split("(default:")[0].replace(name.upper(), "").split()
        assert len(words) >= 3, f"{kind} {flag}: no help text ({text!r})"
        assert "``" not in text and ":data:" not in text, f"{kind} {flag}: docstring markup in {text!r}"


def test_msd_axis_help_comes_from_the_docstring(capsys):
    code, out, _ = _run(["ingest", "msd", "--help"], capsys)
    assert code == 0
    assert ('Slice axis of the volumes after reorientation to the closest canonical orientation (RAS): "axial" '
            '(S, canonical axis 2), "coronal" (A, 1), "sagittal" (R, 0), or an index 0, 1, 2 / -1..-3 of the '
            "canonical array. (default: 'axial')") in _option_help(out, "--axis")


def test_ingest_list_option_accepts_comma_separated_values(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    code, _, err = _run(["ingest", "synthetic", "--out", str(out_dir), "--num-patients", "8", "--images-per-patient",
                         "2", "--size", "8", "--split-ratios", "0.75,0.125,0.125", "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["split_ratios"] == [0.75, 0.125, 0.125]
    assert {k: v["patients"] for k, v in manifest["splits"].items()} == {"train": 6, "val": 1, "test": 1}


def test_set_list_values_accept_commas_as_well_as_brackets():
    commas = load_pipeline(QUICKSTART, overrides=["label_fractions=0.05,0.25", "seeds=0,3",
                                                  "stages.finetune.model.features=8,16,32"])
    brackets = load_pipeline(QUICKSTART, overrides=["label_fractions=[0.05,0.25]", "seeds=[0,3]",
                                                    "stages.finetune.model.features=[8,16,32]"])
    assert commas.label_fractions == brackets.label_fractions == [0.05, 0.25]
    assert commas.seeds == brackets.seeds == [0, 3]
    built = [stage_config_from_dict(dict(cfg.stages["finetune"])) for cfg in (commas, brackets)]
    assert built[0] == built[1] and tuple(built[0].model.features) == (8, 16, 32)
    # a text field keeps its comma
    assert load_pipeline(QUICKSTART, overrides=["description=a,b"]).description == "a,b"

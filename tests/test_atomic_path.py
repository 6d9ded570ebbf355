"""medcl.storage.atomic_path: the one temp-name-then-rename writer every local file write uses."""
from __future__ import annotations

import threading

import pytest

from medcl.storage import atomic_path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with atomic_path(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


def test_threads_writing_one_file_never_share_a_temp_name(tmp_path):
    target = tmp_path / "curve.png"
    barrier = threading.Barrier(8)
    names: list[str] = []

    def write(i: int) -> None:
        with atomic_path(target) as tmp:
            names.append(tmp.name)
            tmp.write_text(str(i) * 1000)
            barrier.wait()  # all eight temp files exist at once

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and all(n.startswith(".curve.png.") and n.endswith(".tmp") for n in names)
    text = target.read_text()
    assert len(set(text)) == 1 and len(text) == 1000  # one writer's whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    from medcl.storage import atomic_dir, refuse_occupied

    out = tmp_path / "pred"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.nii.gz").write_text("half")
            raise RuntimeError("bad case")
    assert list(tmp_path.iterdir()) == []  # neither out nor a staging folder
    with atomic_dir(out) as tmp:
        (tmp / "a.nii.gz").write_text("new")
    assert [p.name for p in out.iterdir()] == ["a.nii.gz"]
    with pytest.raises(ValueError, match=rf"{out} exists and is not empty; choose another --out"):
        refuse_occupied(out, force=False)
    assert refuse_occupied(out, force=True) is True
    with atomic_dir(out) as tmp:  # replaces the old folder, whose backup is removed
        (tmp / "b.png").write_text("b")
    assert [p.name for p in tmp_path.iterdir()] == ["pred"] and [p.name for p in out.iterdir()] == ["b.png"]

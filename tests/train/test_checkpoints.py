"""Checkpoint directories: round trip, DDP unwrapping, atomic layout, refusal of pickled objects."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medcl.train.checkpoints import load_checkpoint, load_model_weights, save_checkpoint
from medcl.train.schedule import warmup_cosine

REPO = Path(__file__).resolve().parents[2]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    for _ in range(3):
        loss = model(torch.randn(5, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_scheduler_and_meta(tmp_path):
    model, opt, sched = _trained()
    cfg = {"lr": 1e-2, "stage": "finetune", "features": (16, 32), "path": Path("/x")}
    save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, scheduler=sched, epoch=4, step=3,
                    config=cfg, metrics={"loss": torch.tensor(0.25), "dice": 0.5})
    assert sorted(os.listdir(tmp_path / "ck")) == ["meta.json", "model.pt", "optimizer.pt", "scheduler.pt"]

    torch.manual_seed(123)
    model2 = _net()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    sched2 = warmup_cosine(opt2, warmup_steps=2, total_steps=10)
    meta = load_checkpoint(tmp_path / "ck", model=model2, optimizer=opt2, scheduler=sched2)

    assert meta["epoch"] == 4 and meta["step"] == 3
    assert meta["config"] == {"lr": 1e-2, "stage": "finetune", "features": [16, 32], "path": "/x"}
    assert meta["metrics"] == {"loss": 0.25, "dice": 0.5}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) and torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"])
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    # continuing both gives identical learning rates
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_ddp_wrapped_model_is_saved_without_module_prefix(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(_net())
        save_checkpoint(tmp_path / "ck", model=model, epoch=0, step=0, config={})
        state = load_model_weights(tmp_path / "ck")
        assert list(state) == list(model.module.state_dict())
        assert not any(k.startswith("module.") for k in state)
        # loading back into a wrapped model goes into the inner module
        torch.manual_seed(5)
        other = nn.parallel.DistributedDataParallel(_net())
        load_checkpoint(tmp_path / "ck", model=other)
        assert torch.equal(other.module[0].weight, model.module[0].weight)
    finally:
        dist.destroy_process_group()


def test_overwrite_is_complete_and_leaves_no_stale_or_temp_files(tmp_path):
    model, opt, sched = _trained()
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, epoch=1, step=3, config={})
    save_checkpoint(tmp_path, model=model, epoch=2, step=6, config={"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "model.pt"]  # no *.tmp, no stale optimizer.pt
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["files"] == ["model.pt"] and meta["format"] == 1
    with pytest.raises(FileNotFoundError, match="saved without optimizer state"):
        load_checkpoint(tmp_path, model=_net(), optimizer=opt)


def test_model_pt_is_written_via_temp_name_and_os_replace(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).name, Path(src).parent == Path(dst).parent))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    save_checkpoint(tmp_path, model=_net(), epoch=0, step=0, config={})
    assert [d for _, d, _ in seen] == ["model.pt", "meta.json"]  # meta.json last
    assert all(same_dir and src.endswith(".tmp") for src, _, same_dir in seen)


class _Payload:
    """An arbitrary object whose unpickling would run code (writes a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_arbitrary_pickled_object_is_refused_and_never_executed(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(ck, model=_net(), epoch=0, step=0, config={})
    marker = tmp_path / "pwned"
    state = dict(_net().state_dict())
    torch.save({**state, "extra": _Payload(str(marker))}, ck / "model.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*model\.pt.*weights_only=True"):
        load_checkpoint(ck, model=_net())
    with pytest.raises(ValueError, match="refusing to load"):
        load_model_weights(ck / "model.pt")
    assert not marker.exists()
    # same for the optimizer file
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, ck / "optimizer.pt")
    torch.save(state, ck / "model.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*optimizer\.pt"):
        load_checkpoint(ck, model=_net(), optimizer=torch.optim.SGD(_net().parameters(), lr=0.1))
    assert not marker.exists()


def test_load_model_weights_accepts_dir_or_file_and_rejects_non_state_dict(tmp_path):
    model = _net()
    save_checkpoint(tmp_path, model=model, epoch=0, step=0, config={})
    from_dir = load_model_weights(tmp_path)
    from_file = load_model_weights(tmp_path / "model.pt")
    assert from_dir.keys() == from_file.keys() == model.state_dict().keys()
    assert all(torch.equal(from_dir[k], v) for k, v in model.state_dict().items())
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a model state_dict"):
        load_model_weights(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_model_weights(tmp_path / "nope.pt")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(TypeError, match=r"config\.obj must be JSON-serialisable"):
        save_checkpoint(tmp_path / "a", model=_net(), epoch=0, step=0, config={"obj": object()})
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        save_checkpoint(tmp_path / "b", model=_net(), epoch=-1, step=0, config={})
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        load_checkpoint(tmp_path, model=_net())
    save_checkpoint(tmp_path / "c", model=_net(), epoch=0, step=0, config={})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(tmp_path / "c", model=nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))


def test_pure_parts_work_without_ray(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # any `import ray` now raises ImportError
        "import torch, medcl.train.checkpoints as c\n"
        "m = torch.nn.Linear(2, 1)\n"
        f"c.save_checkpoint({str(tmp_path)!r}, model=m, epoch=1, step=2, config={{}})\n"
        f"print(c.load_checkpoint({str(tmp_path)!r}, model=torch.nn.Linear(2, 1))['epoch'])\n"
        "import medcl.train\n"
        "print('no ray')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "no", "ray"]

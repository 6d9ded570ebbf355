"""Local stages that can move the network (issue 14, defect 5).

* A batch without an anchor pixel takes no optimiser step (AdamW would still move
  the weights on a zero gradient: momentum and weight decay), and is counted.
* Every stage reports how far it moved the parts it hands over.
* ``has_anchor`` agrees with the loss: the loss has a non-zero gradient exactly when
  there is an anchor.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from medcl.config.stages import LocalPretrainConfig, UNetSpec
from medcl.losses import has_anchor, supervised_local_contrastive
from medcl.train.loop import StageInputs, build_optimizer, fit
from medcl.train.stages import STAGES
from medcl.train.weight_change import WeightChange
from tests.in_process import InProcessContext


@dataclass(frozen=True)
class _Cfg:
    kind: str = "local_pretrain"
    max_epochs: int = 1
    checkpoint_every: int = 1
    lr: float = 1e-2
    weight_decay: float = 0.1
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(3, 3)
        self.decoder = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_an_epoch_of_only_skipped_batches_is_an_error_and_moves_nothing():
    torch.manual_seed(0)
    net = _Net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer, scheduler = build_optimizer(net.parameters(), _Cfg(), steps_per_epoch=2)

    def loss_fn(batch):
        return net(batch).sum() * 0.0, {"skip_step": True}

    with pytest.raises(ValueError, match="all 2 batches of the epoch were skipped"):
        fit(InProcessContext({}), _Cfg(), net, optimizer, scheduler, lambda e: [torch.ones(2, 3)] * 2, loss_fn)
    assert all(torch.equal(v, start[k]) for k, v in net.state_dict().items())


def test_only_unskipped_batches_step_and_weight_change_is_relative_to_the_start():
    torch.manual_seed(0)
    net = _Net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer, scheduler = build_optimizer(net.parameters(), _Cfg(), steps_per_epoch=4)
    steps = []

    def loss_fn(batch):
        x, skip = batch
        if not skip:
            steps.append({k: v.clone() for k, v in net.state_dict().items()})
        return (net(x) ** 2).mean(), {"skip_step": skip}

    batches = [(torch.ones(2, 3), True), (torch.ones(2, 3), False), (torch.ones(2, 3), True),
               (torch.ones(2, 3), True)]
    ctx = InProcessContext({})
    fit(ctx, _Cfg(), net, optimizer, scheduler, lambda e: batches, loss_fn,
        weight_change=WeightChange(net, ("encoder", "decoder")))
    report = ctx.reports[-1]
    assert report["train/steps"] == 1 and report["train/skipped_steps"] == 3
    assert all(torch.equal(v, start[k]) for k, v in steps[0].items())  # the first (skipped) batch moved nothing
    for part in ("encoder", "decoder"):
        w0 = torch.cat([start[f"{part}.weight"].flatten(), start[f"{part}.bias"]])
        w1 = torch.cat([getattr(net, part).weight.detach().flatten(), getattr(net, part).bias.detach()])
        expected = float((w1 - w0).norm() / w0.norm())
        assert expected > 0
        assert report[f"train/weight_change/{part}"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", ["exact", "stride", "block"])
def test_has_anchor_agrees_with_the_loss_gradient(mode):
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        labels = torch.zeros(2, 8, 8, dtype=torch.long)
        if trial % 3:  # a few foreground pixels at random places (sometimes off the stride grid)
            idx = torch.randint(0, 64, (trial % 4 + 1,), generator=g)
            labels.view(2, -1)[trial % 2, idx] = 1 + trial % 2
        features = torch.randn(2, 2, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
        loss = supervised_local_contrastive(features, labels, mode=mode, stride=3, block_size=3)
        loss.backward()
        moved = bool(features.grad.abs().sum() > 0)
        assert has_anchor(labels, mode, stride=3, block_size=3) == moved, (mode, trial, labels.nonzero())


def test_local_stage_marks_batches_without_foreground():
    cfg = LocalPretrainConfig(model=UNetSpec(features=(4, 8), embed_dim=4), mode="stride", stride=2)
    inputs = StageInputs(dataset_dir="", in_channels=1, num_classes=2)
    stage = STAGES["local_pretrain"]
    net = stage.trainable(stage.build(cfg, inputs), cfg)
    loss_fn = stage.loss(InProcessContext({}), cfg, inputs, net, torch.Generator().manual_seed(0))
    images = torch.rand(2, 1, 8, 8)
    background = torch.zeros(2, 8, 8)
    _, logs = loss_fn({"image": images, "mask": background})
    assert logs["skip_step"] is True
    foreground = background.clone()
    foreground[0, 2, 2] = 1  # on the stride-2 grid
    _, logs = loss_fn({"image": images, "mask": foreground})
    assert logs["skip_step"] is False

"""The five stage kinds, one :class:`~medcl.train.stage.Stage` object each, by config ``kind``."""
from __future__ import annotations

from medcl.train.stage import Stage
from medcl.train.stages.cls_finetune import CLS_FINETUNE
from medcl.train.stages.cls_pretrain import CLS_PRETRAIN
from medcl.train.stages.global_pretrain import GLOBAL_PRETRAIN
from medcl.train.stages.local_pretrain import LOCAL_PRETRAIN
from medcl.train.stages.seg_finetune import SEG_FINETUNE

__all__ = ["STAGES"]

STAGES: dict[str, Stage] = {
    stage.kind: stage for stage in (GLOBAL_PRETRAIN, LOCAL_PRETRAIN, SEG_FINETUNE, CLS_PRETRAIN, CLS_FINETUNE)
}

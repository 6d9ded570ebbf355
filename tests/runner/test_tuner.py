"""Where trials run and what they reserve (``medcl.runner.tuner.trial_placement``), no Ray instance needed."""
from __future__ import annotations

import pytest

from medcl.config.stages import ScalingSpec
from medcl.runner.tuner import trial_placement

# (scaling, cpu, gpu, fractional_gpu) -> (inline, trial resources, use_gpu, trainer scaling), written out by hand.
CASES = [
    # A pipeline or sweep on one CPU worker: the stage runs in the trial, which holds the CPU.
    (ScalingSpec(num_workers=1), 1.0, 0.0, False,
     True, {"CPU": 1.0}, False, ScalingSpec(num_workers=1)),
    # A pipeline on one GPU: a TorchTrainer with one GPU worker; the trial drives it.
    (ScalingSpec(num_workers=1, use_gpu=True, cpus_per_worker=2.0), 2.0, 1.0, False,
     False, {"CPU": 0.01}, True, ScalingSpec(num_workers=1, use_gpu=True, cpus_per_worker=2.0)),
    # A sweep sharing a GPU between trials: inline on half a GPU.
    (ScalingSpec(num_workers=1), 3.0, 0.5, True,
     True, {"CPU": 3.0, "GPU": 0.5}, True, ScalingSpec(num_workers=1, use_gpu=True, cpus_per_worker=3.0)),
    # Two workers: a TorchTrainer whose workers take the sweep's CPUs.
    (ScalingSpec(num_workers=2, max_failures=0), 0.5, 0.0, True,
     False, {"CPU": 0.01}, False, ScalingSpec(num_workers=2, cpus_per_worker=0.5, max_failures=0)),
]


@pytest.mark.parametrize("scaling, cpu, gpu, fractional, inline, resources, use_gpu, trainer", CASES)
def test_trial_placement(scaling, cpu, gpu, fractional, inline, resources, use_gpu, trainer):
    placement = trial_placement(scaling, cpu=cpu, gpu=gpu, fractional_gpu=fractional)
    assert (placement.inline, placement.resources, placement.use_gpu) == (inline, resources, use_gpu)
    if not inline:
        assert placement.scaling == trainer

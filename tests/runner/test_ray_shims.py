"""Workarounds touching Ray internals (``medcl.runner.ray_shims``), checked against Ray 2.60's files.

The restored-callbacks shim is exercised by the sweep resume test (``test_sweep.py``:
the callbacks passed on ``--resume`` see the restored trial start).
"""
from __future__ import annotations

import json

from medcl.runner.ray_shims import forget_pending_decisions


def test_restore_forgets_decisions_waiting_on_a_save(tmp_path):
    # Ray Tune 2.60 writes decisions cached while a checkpoint save was in flight into the
    # experiment state; a trial killed during that save would be stopped after its resume.
    state = {"trial_data": [["{}", "{}"]], "stats": {"start_time": 1.5},
             "runner_data": {"_cached_trial_decisions": {"abc_00001": "STOP"},
                             "_queued_trial_decisions": {"abc_00000": "CONTINUE"}, "_iteration": 7}}
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    (tmp_path / "basic-variant-state-2026-01-01_00-00-00.json").write_text('{"_cached_trial_decisions": 1}')
    forget_pending_decisions(str(tmp_path))
    after = json.loads((tmp_path / "experiment_state-2026-01-01_00-00-00.json").read_text())
    assert after["runner_data"] == {"_cached_trial_decisions": {}, "_queued_trial_decisions": {}, "_iteration": 7}
    assert after["trial_data"] == state["trial_data"] and after["stats"] == state["stats"]
    assert (tmp_path / "basic-variant-state-2026-01-01_00-00-00.json").read_text() == '{"_cached_trial_decisions": 1}'

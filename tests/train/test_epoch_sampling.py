"""Capped epochs draw uniformly from the whole training set (issue 14, defect 1).

The dataset is written patient by patient over many shards (the order an ingest leaves), with
more rows than the local shuffle window. ``labelled_slices`` + ``epoch_batches`` with a
``max_steps_per_epoch`` cap must give: every subject in one capped epoch, per-subject counts a
uniform sample explains (chi-square against the hypergeometric expectation, fixed seeds: not
flaky), consecutive capped epochs that never repeat a row within a pass, and a resumed epoch
that draws what the uninterrupted run drew. Before the fix the stream kept the shards' order and
every epoch restarted it, so a capped epoch saw only the first patients, the same ones every epoch.
"""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
from in_process import InProcessContext

from medcl.config import SegFinetuneConfig
from medcl.data import streams
from medcl.data.image_block import ImageBlock
from medcl.data.shards import write_dataset
from medcl.train.loop import epoch_batches

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

# Slices of patient k: 2100 rows, several times Ray's local shuffle buffer (which holds ~1.5-2x the
# 256-row window before it yields); 262 full batches of 8 a pass, and 3 capped epochs of 60 steps
# (the hippocampus fine-tuning budget) lie inside the first pass.
SIZES = [120 + 10 * k for k in range(12)]
BATCH, CAP = 8, 60
HW = 32
# Ray Data cuts blocks of at most this many bytes (128 MiB by default): hippocampus's 20 % labelled stream
# (939 rows of 48 kB) is 2 blocks; 1 MiB makes this stream (2100 rows of 12 kB) ~25 blocks, as large
# rows would. Ray's local shuffle mixes the blocks in its buffer, so a stream of one block hides the bias.
BLOCK_BYTES = 1 << 20
# chi-square with 11 degrees of freedom: P(X > 31.26) = 0.001
CHI2_11_999 = 31.26

CFG = SegFinetuneConfig(seed=0, batch_size_per_worker=BATCH, max_steps_per_epoch=CAP)


@pytest.fixture(scope="module")
def stream(ray_session, tmp_path_factory):
    """The materialised labelled stream of 12 training patients written in order, 200 rows a shard (11 shards)."""
    rng = np.random.default_rng(0)
    blocks = [ImageBlock(images=rng.random((n, 1, HW, HW), dtype=np.float32), patient_id=f"p{k:02d}",
                         volume_id=f"p{k:02d}-v0", split="train", source_path=f"p{k}.nii", site="A",
                         slice_index=list(range(n)), slice_position=[i / n for i in range(n)],
                         masks=rng.integers(0, 2, (n, HW, HW)), class_label=0)
              for k, n in enumerate(SIZES)]
    out = tmp_path_factory.mktemp("sampling") / "ds"
    write_dataset(out, blocks, source={"kind": "test", "path": "", "options": {}}, task="segmentation",
                  fingerprint="test-epoch-sampling", label_map={0: "bg", 1: "fg"}, rows_per_shard=200)
    assert len(list(out.glob("shard-*.parquet"))) == 11
    context = ray_session.data.DataContext.get_current()
    default, context.target_max_block_size = context.target_max_block_size, BLOCK_BYTES
    try:
        ds = streams.labelled_slices(out, 1.0, seed=0)
    finally:
        context.target_max_block_size = default
    assert len(list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))) >= 10
    return ds


def _rows(batches) -> list[tuple[str, int]]:
    return [(str(v), int(s)) for b in batches for v, s in zip(b["volume_id"], b["slice_index"].tolist())]


def test_one_capped_epoch_is_a_uniform_sample_of_every_subject(stream):
    rows = _rows(epoch_batches(InProcessContext({"train": stream}), CFG, epoch=0))
    assert len(rows) == CAP * BATCH == len(set(rows))
    counts = np.array([sum(v == f"p{k:02d}-v0" for v, _ in rows) for k in range(len(SIZES))])
    assert (counts > 0).all(), f"subjects never drawn: {np.flatnonzero(counts == 0).tolist()}"
    # n rows drawn without replacement from N: patient k's count is hypergeometric, mean n K_k / N;
    # the finite-population correction (N - n) / (N - 1) scales Pearson's statistic to chi-square(11).
    n, total = len(rows), sum(SIZES)
    expected = n * np.asarray(SIZES) / total
    chi2 = float((((counts - expected) ** 2) / expected).sum()) / ((total - n) / (total - 1))
    assert chi2 < CHI2_11_999, f"per-subject counts {counts.tolist()} vs expected {expected.round(1).tolist()}"


def test_consecutive_capped_epochs_continue_the_pass_and_resume_draws_the_same(stream):
    ctx, cfg = InProcessContext({"train": stream}), CFG
    epochs = [_rows(epoch_batches(ctx, cfg, epoch=e)) for e in range(3)]
    # 3 x 60 steps of the 262 a pass: no row twice
    assert all(len(e) == CAP * BATCH for e in epochs)
    assert len(set().union(*epochs)) == 3 * CAP * BATCH
    # one iterator across epochs (what run_loop uses) draws the same epochs: a resumed run, which
    # positions a fresh iterator at its epoch, draws what the uninterrupted run drew
    endless = epoch_batches(ctx, cfg, 0, steps=CAP, epochs=None)
    assert [_rows(islice(endless, CAP)) for _ in range(3)] == epochs
    # the next epoch crosses into the second pass: new local-shuffle seed, every step still a full batch
    fourth = _rows(islice(endless, CAP))
    assert len(fourth) == CAP * BATCH and fourth == _rows(epoch_batches(ctx, cfg, epoch=3))

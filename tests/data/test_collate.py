"""Tests of medcl.data.collate on hand-built numpy batches (the form Ray Data passes to collate_fn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medcl.data.bags import sample_micle_pairs
from medcl.data.collate import MiclePairCollate, PartitionCollate, TensorCollate, tensor_from_numpy, torch_batches


def _bags(n_images=(3, 1, 4), hw=2):
    rng = np.random.default_rng(0)
    images = [rng.random((n, 1, hw, hw), dtype=np.float32) for n in n_images]
    return {
        "patient_id": np.asarray([f"p{i}" for i in range(len(n_images))], dtype=object),
        "images": np.asarray([im.reshape(-1) for im in images], dtype=object),
        "image_shape": np.asarray([[1, hw, hw]] * len(n_images)),
        "num_images": np.asarray(n_images),
    }, images


def test_tensor_collate_numeric_columns_become_tensors_ids_stay_strings():
    batch = {"image": np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2), "slice_index": np.array([3, 4]),
             "patient_id": np.asarray(["a", "b"], dtype=object)}
    out = TensorCollate("cpu")(batch)
    assert isinstance(out["image"], torch.Tensor) and out["image"].dtype == torch.float32
    np.testing.assert_array_equal(out["image"].numpy(), batch["image"])
    assert out["slice_index"].dtype == torch.int64 and out["slice_index"].tolist() == [3, 4]
    assert isinstance(out["patient_id"], np.ndarray) and out["patient_id"].tolist() == ["a", "b"]


def test_tensor_from_numpy_shares_writable_memory_and_copies_read_only():
    a = np.zeros(3, dtype=np.float32)
    tensor_from_numpy(a)[0] = 1.0
    assert a[0] == 1.0
    ro = np.zeros(3, dtype=np.float32)
    ro.setflags(write=False)
    tensor_from_numpy(ro)[0] = 1.0
    assert ro[0] == 0.0


def test_micle_collate_draws_the_seeded_pairs_of_sample_micle_pairs():
    batch, images = _bags()
    out = MiclePairCollate(seed=5)(batch)
    ref = sample_micle_pairs(batch, np.random.default_rng(5))
    assert out["index_a"].tolist() == ref["index_a"].tolist() and out["index_b"].tolist() == ref["index_b"].tolist()
    for i, im in enumerate(images):
        np.testing.assert_array_equal(out["image_a"][i].numpy(), im[int(out["index_a"][i])])
        np.testing.assert_array_equal(out["image_b"][i].numpy(), im[int(out["index_b"][i])])


def test_validation_errors():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        torch_batches(None, 0)
    with pytest.raises(ValueError, match="num_partitions must be an integer >= 1"):
        PartitionCollate(num_partitions=0)

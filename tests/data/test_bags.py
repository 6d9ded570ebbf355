"""Tests of medcl.data.bags on hand-built bag batches (the numpy form Ray Data passes to collate_fn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medcl.data.bags import bag_images, sample_micle_pairs, sample_partitions

C, H, W = 1, 4, 5


def _image(pid: int, k: int) -> np.ndarray:
    """Image k of patient pid: constant 100*pid + k, so the value identifies the image."""
    return np.full((C, H, W), 100 * pid + k, dtype=np.float32)


def _bags(sizes: list[int], positions: list[list[float]] | None = None,
          volumes: list[list[str]] | None = None) -> dict[str, np.ndarray]:
    """A batch of bags like ray's iter_batches(batch_format="numpy"): list columns as object arrays."""
    rows = {k: [] for k in ("patient_id", "num_images", "images", "image_shape", "volume_ids", "slice_positions")}
    for pid, n in enumerate(sizes):
        rows["patient_id"].append(f"p{pid}")
        rows["num_images"].append(n)
        rows["images"].append(np.concatenate([_image(pid, k).ravel() for k in range(n)]))
        rows["image_shape"].append(np.array([C, H, W], dtype=np.int32))
        rows["volume_ids"].append(np.array(volumes[pid] if volumes else [f"p{pid}-v0"] * n, dtype=object))
        pos = positions[pid] if positions else [k / n for k in range(n)]
        rows["slice_positions"].append(np.asarray(pos, dtype=np.float32))
    out = {}
    for key, values in rows.items():
        if key in ("patient_id", "num_images"):
            out[key] = np.asarray(values)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[key] = arr
    return out


def _ids(images: torch.Tensor) -> list[tuple[int, int]]:
    """(patient, image index) of each image from its constant value."""
    vals = images[:, 0, 0, 0].round().long().tolist()
    return [(v // 100, v % 100) for v in vals]


class TestMiclePairs:
    def test_two_different_images_of_the_same_bag(self):
        batch = _bags([2, 5, 3, 4])
        rng = np.random.default_rng(0)
        seen = {pid: set() for pid in range(4)}
        for _ in range(60):
            out = sample_micle_pairs(batch, rng)
            assert out["image_a"].shape == out["image_b"].shape == (4, C, H, W)
            assert out["image_a"].dtype == torch.float32
            assert list(out["patient_id"]) == ["p0", "p1", "p2", "p3"]
            for row, ((pa_, ka), (pb, kb)) in enumerate(zip(_ids(out["image_a"]), _ids(out["image_b"]))):
                assert pa_ == pb == row
                assert ka != kb
                assert (ka, kb) == (int(out["index_a"][row]), int(out["index_b"][row]))
                # Images themselves are the stored arrays, unchanged.
                assert torch.equal(out["image_a"][row], torch.from_numpy(_image(row, ka)))
                seen[row].add((ka, kb))
        # Random choice: every ordered pair of the 2-bag and most pairs of the 5-bag occur.
        assert seen[0] == {(0, 1), (1, 0)}
        assert len(seen[1]) >= 15  # of 20 ordered pairs

    def test_bag_of_one_gives_the_image_twice(self):
        out = sample_micle_pairs(_bags([1, 3]), rng=1)
        assert torch.equal(out["image_a"][0], torch.from_numpy(_image(0, 0)))
        assert torch.equal(out["image_b"][0], torch.from_numpy(_image(0, 0)))
        assert _ids(out["image_a"])[1][1] != _ids(out["image_b"])[1][1]

    def test_seeded(self):
        batch = _bags([4, 4, 4])
        a = sample_micle_pairs(batch, rng=5)
        b = sample_micle_pairs(batch, rng=np.random.default_rng(5))
        assert torch.equal(a["index_a"], b["index_a"]) and torch.equal(a["index_b"], b["index_b"])

    def test_two_dimensional_and_list_columns(self):
        """Ray may hand equal-length list columns as 2-D arrays; plain lists also work."""
        batch = _bags([2, 2])
        batch["images"] = np.stack(list(batch["images"]))
        batch["image_shape"] = np.stack(list(batch["image_shape"]))
        out = sample_micle_pairs(batch, rng=0)
        assert [p for p, _ in _ids(out["image_a"])] == [0, 1]
        batch["images"] = [list(r) for r in batch["images"]]
        assert sample_micle_pairs(batch, rng=0)["image_a"].shape == (2, C, H, W)

    def test_errors(self):
        batch = _bags([2, 2])
        batch["num_images"] = np.array([2, 3])
        with pytest.raises(ValueError, match=r"patient 'p1': num_images=3 but images hold 2"):
            sample_micle_pairs(batch)
        batch = _bags([2, 2])
        batch["image_shape"][1] = np.array([1, 2, 10], dtype=np.int32)
        with pytest.raises(ValueError, match=r"share one image shape"):
            sample_micle_pairs(batch)
        batch = _bags([2])
        batch["images"][0] = batch["images"][0][:-1]
        with pytest.raises(ValueError, match=r"patient 'p0': 39 image values is not a positive multiple of C\*H\*W=20"):
            sample_micle_pairs(batch)
        with pytest.raises(ValueError, match=r"no column 'image_shape'; got columns \['patient_id'\]"):
            sample_micle_pairs({"patient_id": np.array(["a"])})
        with pytest.raises(TypeError, match="rng must be"):
            sample_micle_pairs(_bags([2]), rng="seed")

    def test_bag_images(self):
        imgs = bag_images(_bags([3]), 0)
        assert imgs.shape == (3, C, H, W) and imgs[2, 0, 0, 0] == 2


class TestPartitions:
    def test_one_slice_per_partition(self):
        n = 8
        batch = _bags([n, n, n])  # positions k/8 -> partition floor(k/2)
        rng = np.random.default_rng(0)
        chosen = {(b, k): set() for b in range(3) for k in range(4)}
        for _ in range(40):
            out = sample_partitions(batch, num_partitions=4, rng=rng)
            assert out["image"].shape == (12, C, H, W)
            assert out["group_id"].tolist() == [0, 1, 2, 3] * 3
            assert out["bag_index"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
            assert list(out["patient_id"]) == ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4
            for row, (pid, k) in enumerate(_ids(out["image"])):
                b, part = divmod(row, 4)
                assert pid == b
                assert k // 2 == part  # slice k (position k/8) lies in partition floor(4k/8)
                assert out["slice_position"][row] == pytest.approx(k / n)
                chosen[(b, part)].add(k)
        assert all(len(v) == 2 for v in chosen.values())  # both slices of each partition get drawn

    def test_missing_partition_takes_nearest_slice(self):
        # 3 slices at 0, 1/3, 2/3: partitions 0, 1, 2; partition 3 (centre 0.875) is empty -> slice 2.
        out = sample_partitions(_bags([3]), num_partitions=4, rng=0)
        assert [k for _, k in _ids(out["image"])] == [0, 1, 2, 2]
        # One slice only: all partitions take it.
        out = sample_partitions(_bags([1]), num_partitions=3, rng=0)
        assert [k for _, k in _ids(out["image"])] == [0, 0, 0]
        assert out["group_id"].tolist() == [0, 1, 2]

    def test_position_one_goes_to_last_partition(self):
        out = sample_partitions(_bags([2], positions=[[0.0, 1.0]]), num_partitions=2, rng=0)
        assert [k for _, k in _ids(out["image"])] == [0, 1]

    def test_multi_volume_bag_uses_one_volume(self):
        vols = [["a", "b", "a", "b", "a", "b", "a", "b"]]
        pos = [[0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]]
        batch = _bags([8], positions=pos, volumes=vols)
        seen = set()
        for seed in range(20):
            out = sample_partitions(batch, num_partitions=4, rng=seed)
            ks = [k for _, k in _ids(out["image"])]
            parity = {k % 2 for k in ks}  # volume a = even slices, b = odd
            assert len(parity) == 1
            assert set(out["volume_id"]) == {"a" if parity == {0} else "b"}
            seen |= parity
        assert seen == {0, 1}

    def test_errors(self):
        with pytest.raises(ValueError, match="num_partitions must be an integer >= 1, got 0"):
            sample_partitions(_bags([2]), num_partitions=0)
        batch = _bags([2])
        batch["slice_positions"][0] = np.array([0.1], dtype=np.float32)
        with pytest.raises(ValueError, match=r"patient 'p0': 2 images but 2 volume_ids and 1 slice_positions"):
            sample_partitions(batch)

"""A synthetic cohort: anatomy-like slices with masks and a patient-level label, deterministic from a seed.

Each patient is a "volume" of ``images_per_patient`` slices at positions
``j / n`` in [0, 1). Every slice shows a smooth textured background with an
elliptical "organ" (shape wobble, rotation, size following an ellipsoid-like
profile along the volume) holding up to two inner structures: structure A in
the first part of the volume, structure B (in most patients) in the second,
so volume partitions differ in what they contain. Contrast is low and noise
per patient varies, so segmentation needs many labelled patients to do well.

Masks (``num_classes`` K, background included): K=2 {organ}; K=3 {organ,
inner} (A and B both "inner"); K=4 {organ, inner_a, inner_b}.

Classification: a patient is "lesion" (label 1) or "normal" (0); a positive
patient shows a small bright blob inside the organ on about ``lesion_rate`` of
its slices; every patient may show a bright distractor blob outside the organ.
The patient label is written to ``class_label`` on every row and in the bag.

``shifted_patients`` extra patients come from a second site "B": the same
anatomy seen through a gamma curve, lower contrast, a linear bias field and
more noise. They are all in the test split (the distribution-shift set); site
"A" test patients are the in-distribution test set.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np

from medcl.data.image_block import ImageBlock
from medcl.data.manifest import Manifest
from medcl.data.schema import SPLITS
from medcl.data.sources.common import IngestError, check_int, run_ingest
from medcl.data.splits import check_split_ratios, split_patients

__all__ = ["generate_synthetic", "ingest_synthetic", "SYNTHETIC_CLASS_NAMES"]

logger = logging.getLogger(__name__)

SYNTHETIC_CLASS_NAMES = ("normal", "lesion")
_LABEL_MAPS = {
    2: {0: "background", 1: "organ"},
    3: {0: "background", 1: "organ", 2: "inner"},
    4: {0: "background", 1: "organ", 2: "inner_a", 3: "inner_b"},
}
_CHUNK = 32  # patients drawn per vectorised step (part of the definition: noise is drawn per chunk)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _inner_distance(uu: np.ndarray, vv: np.ndarray, cu: np.ndarray, cv: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance-like value (> 0 inside) of an inner ellipse of radius r (0 = absent), in edge widths."""
    safe = np.maximum(r, 1e-3)
    inside = 1 - np.sqrt(((uu - cu) / safe) ** 2 + ((vv - cv) / (0.8 * safe)) ** 2)
    return np.where(r > 1e-3, inside, -1.0) * r / 0.06


def _blob(d2: np.ndarray, r: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Gaussian blob of peak ``amp`` and std ``r`` at squared distance ``d2``."""
    return amp * np.exp(-d2 / (2 * r ** 2))


def _draw_site(seed: int, site: int, n_patients: int, n_slices: int, size: int, num_classes: int,
               positive_fraction: float, lesion_rate: float, noise: float,
               lesion_contrast: float = 1.0) -> dict[str, np.ndarray]:
    """Images (P*S, 1, H, W), masks (P*S, H, W), per-patient labels (P,), per-image lesion flags (P*S,)."""
    rng = np.random.default_rng([seed, site])
    P, S = n_patients, n_slices

    def u(lo: float, hi: float, shape: tuple[int, ...] = (P,)) -> np.ndarray:
        return rng.uniform(lo, hi, size=shape).astype(np.float32)

    p = {  # per-patient anatomy and intensity parameters
        "cx": u(-0.12, 0.12), "cy": u(-0.12, 0.12), "dx": u(-0.2, 0.2), "dy": u(-0.2, 0.2),
        "a": u(0.45, 0.75), "b": u(0.3, 0.5), "theta": u(0, np.pi), "twist": u(-0.6, 0.6),
        "e2": u(0, 0.15), "e3": u(0, 0.1), "p2": u(0, 2 * np.pi), "p3": u(0, 2 * np.pi),
        "ua": u(-0.3, 0.3), "va": u(-0.25, 0.25), "ra": u(0.3, 0.5),
        "ub": u(-0.3, 0.3), "vb": u(-0.25, 0.25), "rb": u(0.25, 0.42),
        "has_b": (rng.random(P) < 0.7).astype(np.float32),
        "bg": u(0.2, 0.35), "co": u(0.08, 0.2), "ca": u(0.06, 0.15) * rng.choice(np.float32([-1, 1]), P),
        "cb": u(0.06, 0.15) * rng.choice(np.float32([-1, 1]), P), "sigma": noise * u(0.7, 1.4),
        "fx": u(0.5, 2.0, (P, 3)), "fy": u(0.5, 2.0, (P, 3)), "ph": u(0, 2 * np.pi, (P, 3)),
        "rate": u(-2.0, 2.0, (P, 3)), "tex": u(4.0, 8.0),
    }
    labels = np.zeros(P, np.int64)
    labels[rng.permutation(P)[: round(positive_fraction * P)]] = 1
    lesion = (rng.random((P, S)) < lesion_rate) & (labels[:, None] == 1)
    les = {"u": u(-0.45, 0.45, (P, S)), "v": u(-0.4, 0.4, (P, S)), "r": u(0.06, 0.1, (P, S)),
           "amp": lesion_contrast * u(0.2, 0.3, (P, S))}
    dis = {"on": (rng.random((P, S)) < 0.5).astype(np.float32), "x": u(-0.85, 0.85, (P, S)),
           "y": u(-0.85, 0.85, (P, S)), "r": u(0.06, 0.1, (P, S)), "amp": u(0.2, 0.3, (P, S))}
    shift = {"gamma": u(0.55, 0.75), "contrast": u(0.7, 0.85), "psi": u(0, 2 * np.pi), "bias": u(0.2, 0.35)}

    g = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    Y, X = np.meshgrid(g, g, indexing="ij")
    X, Y = X[None, None], Y[None, None]  # (1, 1, H, W)
    t = (np.arange(S, dtype=np.float32) / S)[None, :, None, None]  # (1, S, 1, 1)
    images, masks = [], []
    for c0 in range(0, P, _CHUNK):
        sl = slice(c0, min(P, c0 + _CHUNK))
        q = {k: v[sl].reshape(-1, 1, 1, 1) for k, v in p.items() if v.ndim == 1}
        scale = 0.55 + 0.45 * np.sin(np.pi * (0.1 + 0.8 * t))
        cx, cy = q["cx"] + q["dx"] * (t - 0.5), q["cy"] + q["dy"] * (t - 0.5)
        th = q["theta"] + q["twist"] * (t - 0.5)
        xr, yr = X - cx, Y - cy
        uu = (xr * np.cos(th) + yr * np.sin(th)) / (q["a"] * scale)
        vv = (-xr * np.sin(th) + yr * np.cos(th)) / (q["b"] * scale)
        rad, phi = np.sqrt(uu ** 2 + vv ** 2), np.arctan2(vv, uu)
        edge = 1 + q["e2"] * np.cos(2 * phi + q["p2"]) + q["e3"] * np.cos(3 * phi + q["p3"])
        organ_d = (edge - rad) / 0.06
        ra = q["ra"] * np.sqrt(np.clip((0.75 - t) / 0.35, 0, 1))
        rb = q["rb"] * np.sqrt(np.clip((t - 0.3) / 0.35, 0, 1)) * q["has_b"]
        a_d = _inner_distance(uu, vv, q["ua"], q["va"], ra)
        b_d = _inner_distance(uu, vv, q["ub"], q["vb"], rb)
        organ, in_a, in_b = organ_d > 0, (a_d > 0) & (organ_d > 0), (b_d > 0) & (organ_d > 0)
        # Intensities: smooth background, soft-edged organ with texture, inner structures.
        fx, fy, ph, rate = (p[k][sl][:, None, None, None, :] for k in ("fx", "fy", "ph", "rate"))
        bg = q["bg"] + 0.04 * np.cos(np.pi * (fx * X[..., None] + fy * Y[..., None]) + ph
                                     + rate * t[..., None]).sum(-1)
        tex = 0.03 * np.cos(q["tex"] * np.pi * (uu * q["a"] + vv * q["b"] * 0.7))
        img = (bg + _sigmoid(organ_d) * (q["co"] + tex) + _sigmoid(a_d) * _sigmoid(organ_d) * q["ca"]
               + _sigmoid(b_d) * _sigmoid(organ_d) * q["cb"])
        # Lesion: small bright blob inside the organ (organ frame coordinates), positive patients only.
        per_image = {k: v[sl][..., None, None] for k, v in (*les.items(), *(("d" + k, v) for k, v in dis.items()))}
        d2 = ((uu - per_image["u"]) * q["a"] * scale) ** 2 + ((vv - per_image["v"]) * q["b"] * scale) ** 2
        img += lesion[sl][..., None, None] * _blob(d2, per_image["r"], per_image["amp"])
        # Distractor: the same kind of blob anywhere in the image, for every patient.
        d2 = (X - per_image["dx"]) ** 2 + (Y - per_image["dy"]) ** 2
        img += per_image["don"] * _blob(d2, per_image["dr"], per_image["damp"])
        chunk_rng = np.random.default_rng([seed, site, 1, c0])
        img = img + q["sigma"] * chunk_rng.standard_normal(img.shape, dtype=np.float32)
        img = np.clip(img, 0, 1)
        if site == 1:  # second site: gamma, contrast, bias field, extra noise
            sh = {k: v[sl].reshape(-1, 1, 1, 1) for k, v in shift.items()}
            bias = 1 + sh["bias"] * (X * np.cos(sh["psi"]) + Y * np.sin(sh["psi"]))
            img = sh["contrast"] * img ** sh["gamma"] * bias + 0.06
            img = np.clip(img + 0.05 * chunk_rng.standard_normal(img.shape, dtype=np.float32), 0, 1)
        mask = organ.astype(np.int64)
        if num_classes >= 3:
            mask[in_a] = 2
            mask[in_b & ~in_a] = 3 if num_classes == 4 else 2
        images.append(img.astype(np.float32).reshape(-1, 1, size, size))
        masks.append(mask.reshape(-1, size, size))
    return {"images": np.concatenate(images), "masks": np.concatenate(masks), "labels": labels,
            "lesion": lesion.reshape(-1)}


def generate_synthetic(
    *,
    num_patients: int = 100,
    images_per_patient: int = 16,
    size: int = 64,
    num_classes: int = 3,
    shifted_patients: int = 0,
    positive_fraction: float = 0.5,
    lesion_rate: float = 0.8,
    noise: float = 0.08,
    lesion_contrast: float = 1.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Draw the cohort in memory (arguments as :func:`ingest_synthetic`).

    Returns:
        ``images`` float32 (N, 1, size, size) in [0, 1]; ``masks`` int64 (N, size, size);
        ``patient_id`` str (N,) ("A-0000", shifted "B-0000"); ``site`` str (N,);
        ``slice_index`` int (N,); ``slice_position`` float32 (N,) = slice_index / images_per_patient;
        ``class_label`` int64 (N,) (the patient's label); ``lesion`` bool (N,) (lesion drawn on the image).
        N = (num_patients + shifted_patients) * images_per_patient, patients in order, slices in order.
    """
    check_int("num_patients", num_patients, 1)
    check_int("images_per_patient", images_per_patient, 1)
    check_int("size", size, 8, 1024)
    check_int("num_classes", num_classes, 2, 4)
    check_int("shifted_patients", shifted_patients, 0)
    check_int("seed", seed, 0)
    for name, value in (("positive_fraction", positive_fraction), ("lesion_rate", lesion_rate), ("noise", noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise IngestError(f"{name}={value!r} must be a number in [0, 1]")
    if isinstance(lesion_contrast, bool) or not isinstance(lesion_contrast, (int, float)) \
            or not 0 <= lesion_contrast <= 4:
        raise IngestError(f"lesion_contrast={lesion_contrast!r} must be a number in [0, 4]")
    parts = []
    for site, n in ((0, num_patients), (1, shifted_patients)):
        if n == 0:
            continue
        d = _draw_site(seed, site, n, images_per_patient, size, num_classes, positive_fraction, lesion_rate, noise,
                       lesion_contrast)
        name = "AB"[site]
        digits = max(4, len(str(n - 1)))
        ids = np.repeat(np.array([f"{name}-{i:0{digits}d}" for i in range(n)]), images_per_patient)
        idx = np.tile(np.arange(images_per_patient), n)
        parts.append({"images": d["images"], "masks": d["masks"], "patient_id": ids,
                      "site": np.full(len(ids), name), "slice_index": idx,
                      "slice_position": (idx / images_per_patient).astype(np.float32),
                      "class_label": np.repeat(d["labels"], images_per_patient), "lesion": d["lesion"]})
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def ingest_synthetic(
    out_dir: str | os.PathLike,
    *,
    num_patients: int = 100,
    images_per_patient: int = 16,
    size: int = 64,
    num_classes: int = 3,
    shifted_patients: int = 0,
    positive_fraction: float = 0.5,
    lesion_rate: float = 0.8,
    noise: float = 0.08,
    lesion_contrast: float = 1.0,
    split_ratios: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    rows_per_shard: int = 2048,
    force: bool = False,
) -> Manifest:
    """Write the synthetic cohort as a dataset directory.

    Args:
        out_dir: Dataset directory to create or replace.
        num_patients: Site-A patients (split train/val/test by ``split_ratios``).
        images_per_patient: Slices per patient (one volume per patient).
        size: Image height and width.
        num_classes: Mask classes including background, 2..4 (see module doc).
        shifted_patients: Extra site-"B" patients, all in the test split.
        positive_fraction: Fraction of patients with label 1 ("lesion").
        lesion_rate: Probability that a positive patient's slice shows the lesion.
        noise: Base standard deviation of the Gaussian noise (varied per patient).
        lesion_contrast: Factor on the lesion's peak brightness (drawn in [0.2, 0.3], as the
            distractor's); 1 keeps the lesion and the distractor alike in brightness.
        split_ratios: (train, val, test) fractions of the site-A patients.
        seed: Seed of everything (same seed -> identical bytes).
        rows_per_shard: Rows per shard file.
        force: Rebuild even if ``out_dir`` is up to date.

    Returns:
        The manifest: task "segmentation" (masks in ``mask``, ``label_map``) with
        ``class_names`` ("normal", "lesion") for the patient label in ``class_label``.
    """
    try:
        ratios = check_split_ratios(split_ratios)
    except ValueError as e:
        raise IngestError(str(e)) from e
    options = {"num_patients": num_patients, "images_per_patient": images_per_patient, "size": size,
               "num_classes": num_classes, "shifted_patients": shifted_patients,
               "positive_fraction": positive_fraction, "lesion_rate": lesion_rate, "noise": noise,
               "split_ratios": list(ratios), "seed": seed, "rows_per_shard": rows_per_shard}
    if lesion_contrast != 1.0:  # recorded only when set, so older cohorts keep their manifest options
        options["lesion_contrast"] = lesion_contrast
    gen_kw = {k: v for k, v in options.items() if k not in ("split_ratios", "rows_per_shard")}
    generate_synthetic(**{**gen_kw, "num_patients": 1, "shifted_patients": 0, "images_per_patient": 1})  # validate
    extras = {"generator": "medcl.data.synthetic", "sites": {"A": "in-distribution", "B": "shifted (test only)"}}

    def blocks() -> Iterator[ImageBlock]:
        d = generate_synthetic(**gen_kw)
        pids = d["patient_id"]
        site_a = sorted(set(pids[d["site"] == "A"].tolist()))
        assignment = split_patients(site_a, ratios, seed)
        assignment.update({p: "test" for p in set(pids[d["site"] == "B"].tolist())})
        starts = np.flatnonzero(np.r_[True, pids[1:] != pids[:-1]])
        bounds = dict(zip(pids[starts].tolist(), zip(starts, np.r_[starts[1:], len(pids)])))
        order = sorted(bounds, key=lambda pid: (pid[0], SPLITS.index(assignment[pid]), pid))
        for pid in order:
            a, b = bounds[pid]
            yield ImageBlock(images=d["images"][a:b], masks=d["masks"][a:b], patient_id=pid, volume_id=pid,
                             split=assignment[pid], site=str(d["site"][a]), source_path=f"synthetic:{pid}",
                             slice_index=d["slice_index"][a:b], slice_position=d["slice_position"][a:b],
                             class_label=d["class_label"][a:b])

    return run_ingest(
        "synthetic", None, out_dir, options, [], None, blocks(), force=force, task="segmentation",
        label_map=_LABEL_MAPS[num_classes], class_names=SYNTHETIC_CLASS_NAMES,
        normalisation="generated in [0, 1] (clipped); site B through gamma/contrast/bias field",
        split_method="random", split_seed=seed, split_ratios=ratios, extras=extras, rows_per_shard=rows_per_shard,
    )

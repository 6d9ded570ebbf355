"""Safe weight loading and stage hand-over helpers.

Everything here is pure torch. Files are read with ``torch.load(weights_only=True)``
(no pickled code runs) or, for ``.safetensors`` files, with the optional
``safetensors`` package. Nothing is ever downloaded.

A *source* is either a state_dict (mapping of key -> tensor) or a path to a file
holding one. A file may also hold a checkpoint dict that wraps the state_dict
under one of :data:`WRAPPER_KEYS` (``{"model_state_dict": ..., "optimizer": ...}``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn

__all__ = [
    "LoadReport",
    "WeightSource",
    "WRAPPER_KEYS",
    "read_state_dict",
    "strip_key_prefixes",
    "sum_input_channels",
    "copy_matching_weights",
]

logger = logging.getLogger(__name__)

WeightSource = Union[Mapping[str, torch.Tensor], str, os.PathLike]

#: Keys under which checkpoint dicts commonly nest the model state_dict, tried in order.
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")


@dataclass(frozen=True)
class LoadReport:
    """What a weight load did, key by key (keys are the *target* module's keys).

    Attributes:
        loaded: target keys whose values were copied from the source.
        missing: target keys in the selected scope that the source lacks
            (they keep their current, usually freshly initialised, values).
        unexpected: source keys in the selected scope that the target lacks.
        skipped: source keys outside the selected scope (dropped heads, ``fc.*``).
        adapted: loaded keys whose value was transformed on the way
            (e.g. a 3-channel ``conv1`` summed to 1 channel).
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (
            f"LoadReport(loaded={len(self.loaded)}, missing={len(self.missing)}, "
            f"unexpected={len(self.unexpected)}, skipped={len(self.skipped)}, "
            f"adapted={list(self.adapted)})"
        )


def _is_tensor_mapping(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _load_file(path: Path) -> object:
    if not path.exists():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"weights path {str(path)!r} is not a file; pass the checkpoint file itself")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # optional dependency
            raise ImportError(
                f"reading {str(path)!r} needs the optional package 'safetensors' "
                "(pip install safetensors), or convert the file to a torch .pth state_dict"
            ) from err
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-weights pickles
        raise ValueError(
            f"could not read weights file {str(path)!r} with torch.load(weights_only=True): {err}"
        ) from err


def read_state_dict(source: WeightSource) -> dict[str, torch.Tensor]:
    """Return the state_dict held by ``source``.

    Args:
        source: a state_dict, or a path to a ``.pth``/``.pt``/``.ckpt`` file
            (read with ``torch.load(weights_only=True, map_location="cpu")``) or a
            ``.safetensors`` file (needs the optional ``safetensors`` package).
            A checkpoint dict wrapping the state_dict under one of
            :data:`WRAPPER_KEYS` is unwrapped.

    Returns:
        A new ``dict`` of key -> tensor (the tensors are not copied).

    Raises:
        FileNotFoundError: the path does not exist.
        ImportError: a ``.safetensors`` file and ``safetensors`` is not installed.
        TypeError: ``source`` is neither a mapping nor a path, or holds no state_dict.
        ValueError: the path is not a readable weights file.
    """
    if isinstance(source, (str, os.PathLike)):
        obj = _load_file(Path(source))
        where = f"file {str(source)!r}"
    elif isinstance(source, Mapping):
        obj = source
        where = "the given mapping"
    else:
        raise TypeError(
            f"source must be a state_dict mapping or a path to a weights file, got {type(source).__name__}"
        )
    if _is_tensor_mapping(obj):
        return dict(obj)  # type: ignore[arg-type]
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and _is_tensor_mapping(obj[key]):
                return dict(obj[key])
        keys = sorted(str(k) for k in obj)[:10]
        raise TypeError(
            f"{where} holds no state_dict: expected a mapping of str -> Tensor or a checkpoint "
            f"dict with one under {list(WRAPPER_KEYS)}, got a mapping with keys {keys}"
        )
    raise TypeError(f"{where} holds a {type(obj).__name__}, not a state_dict")


def strip_key_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` from the start of every key, repeatedly.

    ``"module.encoder.backbone.conv1.weight"`` with prefixes
    ``("module.", "encoder.", "backbone.")`` becomes ``"conv1.weight"``.

    Raises:
        ValueError: two source keys end up as the same key.
    """
    prefixes = tuple(prefixes)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if new.startswith(prefix) and len(new) > len(prefix):
                    new = new[len(prefix):]
                    stripped = True
        if new in out:
            raise ValueError(
                f"source keys {origin[new]!r} and {key!r} both map to {new!r} after removing "
                f"prefixes {list(prefixes)}; pass a state_dict of one model"
            )
        out[new] = value
        origin[new] = key
    return out


def sum_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a conv weight ``[O, C_src, kh, kw]`` to ``in_channels`` input channels.

    Only ``C_src -> 1`` is supported: the kernel is summed over its input-channel
    dimension, so a grey image ``g`` gives the same response as the RGB image
    ``(g, g, g)`` gave to the original weights (the usual way to reuse RGB
    ImageNet weights on 1-channel images).

    Raises:
        ValueError: the weight is not 4-D or the adaptation is not ``C_src -> 1``.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a conv weight [O, C, kh, kw], got shape {tuple(weight.shape)}")
    if weight.shape[1] == in_channels:
        return weight
    if in_channels != 1:
        raise ValueError(
            f"cannot adapt a conv weight with {weight.shape[1]} input channels to {in_channels}; "
            "only summing to 1 channel is supported"
        )
    return weight.sum(dim=1, keepdim=True)


def copy_matching_weights(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    scope: Iterable[str] | None = None,
    *,
    strict: bool = True,
    ignore_unexpected: bool = False,
    ignore: Iterable[str] = (),
    adapt: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
) -> LoadReport:
    """Copy the entries of ``state_dict`` whose keys match ``module``'s into ``module``.

    Args:
        module: the target module (its parameters and buffers are overwritten in place).
        state_dict: source key -> tensor, keys already in the target's naming.
        scope: key prefixes (without the trailing dot) to load, e.g. ``("encoder",)``;
            keys outside it are skipped on both sides. ``None`` means every key.
        strict: raise if a target key in scope is missing from the source or (unless
            ``ignore_unexpected``) a source key in scope is unknown to the target.
        ignore_unexpected: with ``strict``, tolerate (but report) unknown source keys.
        ignore: source key prefixes that are always skipped (e.g. ``"fc."``).
        adapt: target key -> function ``(source_tensor, target_tensor) -> tensor``
            applied before the shape check (e.g. channel summing for ``conv1.weight``).

    Returns:
        A :class:`LoadReport`.

    Raises:
        ValueError: a shape mismatch (naming the key and both shapes), nothing in
            scope matched, or ``strict`` and some keys were missing/unexpected. The
            module is left unchanged when it raises.
    """
    scope_t = None if scope is None else tuple(scope)
    ignore_t = tuple(ignore)
    adapt = dict(adapt or {})

    def in_scope(key: str) -> bool:
        return scope_t is None or any(key == p or key.startswith(p + ".") for p in scope_t)

    target = module.state_dict(keep_vars=True)
    target_keys = [k for k in target if in_scope(k)]
    skipped = [k for k in state_dict if not in_scope(k) or k.startswith(ignore_t)]
    skipped_set = set(skipped)
    source = {k: v for k, v in state_dict.items() if k not in skipped_set}

    loaded: list[str] = []
    adapted: list[str] = []
    new_values: dict[str, torch.Tensor] = {}
    for key in target_keys:
        if key not in source:
            continue
        value = source[key]
        if key in adapt and value.shape != target[key].shape:
            value = adapt[key](value, target[key])
            adapted.append(key)
        if value.shape != target[key].shape:
            raise ValueError(
                f"shape mismatch for {key!r}: source has {tuple(source[key].shape)}, "
                f"model expects {tuple(target[key].shape)}"
            )
        new_values[key] = value
        loaded.append(key)
    missing = [k for k in target_keys if k not in source]
    unexpected = [k for k in source if k not in target]

    scope_desc = "all keys" if scope_t is None else f"prefixes {list(scope_t)}"
    if not loaded:
        sample = sorted(state_dict)[:5]
        raise ValueError(
            f"no source weights matched the model in scope {scope_desc}; "
            f"source has {len(state_dict)} keys, e.g. {sample}"
        )
    if strict and (missing or (unexpected and not ignore_unexpected)):
        raise ValueError(
            f"strict load in scope {scope_desc}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}; pass strict=False to load the rest"
        )
    with torch.no_grad():
        for key, value in new_values.items():
            target[key].copy_(value.to(device=target[key].device, dtype=target[key].dtype))
    report = LoadReport(
        loaded=tuple(loaded),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        skipped=tuple(skipped),
        adapted=tuple(adapted),
    )
    logger.info("loaded weights into %s: %s", type(module).__name__, report)
    return report

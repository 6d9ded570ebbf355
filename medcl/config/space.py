"""The search space of a sweep: distributions, which keys can be swept, and one trial's stage configs.

``space`` maps dotted keys into the pipeline (``seed``, ``label_fraction``,
``stages.<stage>.<key>[.<key>]``) to distributions; :func:`resolve_chain`
applies one trial's values to the pipeline's stage templates.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medcl.config.binder import ConfigError
from medcl.config.paths import flatten, set_path
from medcl.config.pipeline import PipelineConfig
from medcl.config.stages import SEED_LIMIT, StageConfig, stage_config_from_dict

__all__ = ["DISTRIBUTIONS", "Distribution", "parse_space", "resolve_chain", "check_space"]

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
_TRIAL_KEYS = ("label_fraction", "seed")  # set on every stage of a trial, not per stage
_FIXED_FIELDS = ("kind", "init_from")


@dataclass(frozen=True)
class Distribution:
    """One search-space entry.

    ``grid``: every value, each trial of the grid once (times ``num_samples``);
    ``choice``: one value drawn per trial; ``uniform`` / ``loguniform``: a float
    in [low, high]; ``randint``: an integer in [low, high).
    """

    kind: Literal["grid", "choice", "uniform", "loguniform", "randint"]
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    def probe_values(self) -> list[Any]:
        """Values that must be valid for the pipeline: every listed value, or both ends of a range."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [float(self.low), float(self.high)]

    def describe(self) -> str:
        """Short text form, e.g. ``loguniform(0.0001, 0.01)`` or ``grid[0.1, 0.5]``."""
        if self.kind in ("grid", "choice"):
            return f"{self.kind}{list(self.values)}"
        return f"{self.kind}({self.low:g}, {self.high:g})"


def _parse_distribution(spec: Any, where: str, problems: list[str]) -> Distribution | None:
    forms = "{grid: [..]}, {choice: [..]}, {uniform: [low, high]}, {loguniform: [low, high]} or {randint: [low, high]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        problems.append(f"{where}: expected one distribution such as {forms}, got {spec!r}")
        return None
    (kind, arg), = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; use one of {', '.join(DISTRIBUTIONS)}"
        problems.append(f"{where}: unknown distribution {kind!r}{hint}")
        return None
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            problems.append(f"{where}.{kind}: expected a non-empty list of values, got {arg!r}")
            return None
        return Distribution(kind, values=tuple(arg))
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
        problems.append(f"{where}.{kind}: expected [low, high] (two numbers), got {arg!r}")
        return None
    low, high = arg
    if not all(math.isfinite(v) for v in arg):
        problems.append(f"{where}.{kind}: low and high must be finite, got {arg!r}")
    elif low >= high:
        problems.append(f"{where}.{kind}: low must be < high, got low={low!r}, high={high!r}")
    elif kind == "loguniform" and low <= 0:
        problems.append(f"{where}.loguniform: low must be > 0 (a log scale), got {low!r}; use uniform for ranges "
                        "that include 0")
    elif kind == "randint" and not all(isinstance(v, int) for v in arg):
        problems.append(f"{where}.randint: low and high must be integers, got {arg!r}")
    else:
        return Distribution(kind, low=low, high=high)
    return None


def parse_space(raw: Any, problems: list[str]) -> dict[str, Distribution]:
    """Dotted key -> distribution of the file's ``space`` (nested entries flattened; later wins).

    Nested entries come from overrides such as ``--set space.stages.local.temperature.grid=[0.1]``.
    Problems are added to ``problems``, each with its ``space.<key>`` path; bad entries are left out.
    """
    if not isinstance(raw, dict):
        return {}
    space: dict[str, Distribution] = {}
    for key, spec in flatten(raw, keep=_is_entry).items():
        dist = _parse_distribution(spec, f"space.{key}", problems)
        if dist is not None:
            space[key] = dist
    return space


def _is_entry(value: dict[str, Any]) -> bool:
    """Whether a mapping in ``space`` is one entry (a distribution, or a malformed one), not a level of keys."""
    return bool(set(value) & set(DISTRIBUTIONS)) or not all(isinstance(v, dict) for v in value.values())


def resolve_chain(pipeline: PipelineConfig, chain: tuple[str, ...] | list[str], values: dict[str, Any],
                  init_from: Path | None = None) -> list[tuple[str, StageConfig]]:
    """The typed stage configs of one trial: the pipeline's templates with the trial's ``values`` applied.

    Args:
        pipeline: The base pipeline.
        chain: Stage names, in order.
        values: Dotted key -> value (``seed``, ``label_fraction``, ``stages.<stage>.<key>[.<key>]``).
        init_from: Checkpoint the first stage starts from (single-stage sweeps).

    Raises:
        ConfigError: A value is not valid for its key (messages carry the stage key path).
    """
    seed = values["seed"] if "seed" in values else pipeline.seeds[0]
    fraction = values["label_fraction"] if "label_fraction" in values else pipeline.label_fractions[0]
    out: list[tuple[str, StageConfig]] = []
    problems: list[str] = []
    for index, name in enumerate(chain):
        data = copy.deepcopy(pipeline.stages[name])
        for key, value in values.items():
            parts = key.split(".")
            if len(parts) >= 3 and parts[0] == "stages" and parts[1] == name:
                try:
                    set_path(data, parts[2:], copy.deepcopy(value))
                except TypeError as exc:
                    problems.append(f"{key}: {exc}")
        data["seed"] = seed
        if hasattr(pipeline.stage(name), "label_fraction"):
            data["label_fraction"] = fraction
        if index == 0 and init_from is not None:
            data["init_from"] = str(init_from)
        try:
            out.append((name, stage_config_from_dict(data, path=f"stages.{name}")))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return out


def _check_space_key(key: str, pipeline: PipelineConfig, chain: tuple[str, ...], where: str) -> str | None:
    """Why ``key`` cannot be swept in this sweep, or None."""
    parts = key.split(".")
    if key in _TRIAL_KEYS:
        if key == "label_fraction" and not any(pipeline.stage(s).uses_labels for s in chain):
            return f"{where}: no stage of this sweep ({' > '.join(chain)}) uses labels"
        return None
    if len(parts) < 3 or parts[0] != "stages" or not all(parts):
        return (f"{where}: unknown key; sweepable keys are {', '.join(_TRIAL_KEYS)} and "
                f"stages.<stage>.<key> for the stages {', '.join(chain)}")
    name, first = parts[1], parts[2]
    if name not in pipeline.stages:
        return f"{where}: the pipeline has no stage {name!r}; its stages: {', '.join(pipeline.stages)}"
    if name not in chain:
        return f"{where}: stage {name!r} is not run by this sweep, which runs {' > '.join(chain)}"
    if first in _TRIAL_KEYS:
        return f"{where}: {first} is set for every stage of a trial; sweep the top-level key {first!r} instead"
    if first in _FIXED_FIELDS:
        return f"{where}: {first} cannot be swept"
    template = pipeline.stage(name)
    kind = template.kind
    fields = [f.name for f in dataclasses.fields(template)]
    if first not in fields:
        close = difflib.get_close_matches(first, fields, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: stage {name!r} ({kind}) has no key {first!r}{hint}"
    return None


def check_space(space: dict[str, Distribution], pipeline: PipelineConfig, chain: tuple[str, ...],
                problems: list[str]) -> None:
    """Add to ``problems`` every space key that cannot be swept and every value that is not valid for its key.

    Ranges are probed at both ends, listed values one by one (see :meth:`Distribution.probe_values`).
    """
    for key, dist in space.items():
        where = f"space.{key}"
        why = _check_space_key(key, pipeline, chain, where)
        if why is not None:
            problems.append(why)
            continue
        if key == "seed" and not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < SEED_LIMIT
                                     for v in dist.probe_values()):
            problems.append(f"{where}: seeds must be integers in [0, 2**31) (use grid, choice or randint), "
                            f"got {dist.describe()}")
            continue
        seen: set[str] = set()
        for value in dist.probe_values():
            try:
                resolve_chain(pipeline, chain, {key: value})
            except ConfigError as exc:
                for problem in exc.problems:
                    if problem in seen:
                        continue
                    seen.add(problem)
                    hint = ""
                    if dist.kind in ("uniform", "loguniform") and "expected an integer" in problem:
                        hint = "; use grid, choice or randint for an integer key"
                    problems.append(f"{where}: {dist.kind} value {value!r} is not valid: {problem}{hint}")
                if dist.kind not in ("grid", "choice"):
                    break  # one message per range

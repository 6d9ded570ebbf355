"""Dotted key paths: get/set/flatten/unflatten against hand-written nested dicts."""
from __future__ import annotations

import pytest

from medcl.config.paths import flatten, get_path, set_path, unflatten

NESTED = {"stages": {"local": {"lr": 0.1, "model": {"features": [8, 16]}}, "global": {"kind": "g"}},
          "seed": 3, "empty": {}}
FLAT = {"stages.local.lr": 0.1, "stages.local.model.features": [8, 16], "stages.global.kind": "g",
        "seed": 3, "empty": {}}


def test_get_path_reads_nested_values():
    assert get_path(NESTED, "stages.local.lr") == 0.1
    assert get_path(NESTED, "stages.local.model") == {"features": [8, 16]}
    assert get_path(NESTED, ["stages", "global", "kind"]) == "g"
    assert get_path(NESTED, "seed") == 3


def test_get_path_errors_name_the_failing_part():
    with pytest.raises(KeyError, match=r"'lrr' not found in stages\.local\.lrr"):
        get_path(NESTED, "stages.local.lrr")
    with pytest.raises(KeyError, match=r"'nosuch' not found in nosuch\.x"):
        get_path(NESTED, "nosuch.x")
    with pytest.raises(TypeError, match=r"^lr is not a mapping$"):
        get_path(NESTED, "stages.local.lr.x")
    with pytest.raises(ValueError, match="empty part"):
        get_path(NESTED, "stages..lr")


def test_set_path_creates_intermediate_mappings_in_place():
    tree = {"a": {"keep": 1}, "n": None}
    assert set_path(tree, "a.b.c", 2) is None
    set_path(tree, "top", [1])
    set_path(tree, ["n", "x"], "y")  # a null in the middle becomes a mapping (as YAML `n:` reads)
    set_path(tree, "a.keep", 5)  # the last part is replaced, whatever it held
    assert tree == {"a": {"keep": 5, "b": {"c": 2}}, "n": {"x": "y"}, "top": [1]}


def test_set_path_refuses_a_non_mapping_in_the_middle():
    tree = {"a": {"b": 1}, "l": [1, 2]}
    with pytest.raises(TypeError, match=r"^b is not a mapping$"):
        set_path(tree, "a.b.c", 2)
    with pytest.raises(TypeError, match=r"^l is not a mapping$"):
        set_path(tree, "l.0", 2)
    assert tree == {"a": {"b": 1}, "l": [1, 2]}
    with pytest.raises(ValueError, match="empty part"):
        set_path(tree, "", 1)


def test_flatten_and_unflatten_round_trip():
    assert flatten(NESTED) == FLAT
    assert unflatten(FLAT) == NESTED
    assert unflatten(flatten(NESTED)) == NESTED
    assert flatten({}) == {} and unflatten({}) == {}
    assert flatten({"x": {"y": 1}}, prefix="p") == {"p.x.y": 1}


def test_flatten_keep_stops_at_chosen_mappings_and_later_keys_win():
    tree = {"a": {"grid": [1, 2]}, "b": {"c": {"grid": [3]}}}
    assert flatten(tree, keep=lambda m: "grid" in m) == {"a": {"grid": [1, 2]}, "b.c": {"grid": [3]}}
    # a literal dotted key and the nested form of the same key: the later wins
    assert flatten({"a.b": 1, "a": {"b": 2}}) == {"a.b": 2}
    assert list(flatten({"x.y": 1, "z": 0, "x": {"y": 2}})) == ["x.y", "z"]  # nested: updated in place
    assert list(flatten({"x": {"y": 1}, "z": 0, "x.y": 2})) == ["z", "x.y"]  # leaf: moves to the end


def test_unflatten_refuses_a_key_below_a_value():
    with pytest.raises(TypeError, match=r"^a is not a mapping$"):
        unflatten({"a": 1, "a.b": 2})

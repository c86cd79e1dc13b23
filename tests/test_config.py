"""Config validation: unknown keys, wrong types and bad values name the dotted key."""

import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mmgen.config import FINITE, apply_overrides, from_dict, load_yaml
from mmgen.errors import ConfigError
from mmgen.recipes.lm import LMRecipe


@dataclass
class Inner:
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer:
    count: int = 1
    name: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_valid_config_and_conversions():
    config = from_dict(Outer, {"count": 3, "inner": {"rate": "1e-3", "pair": [0.8, 0.9], "kind": "b"}})
    assert config.count == 3 and config.inner.rate == 1e-3 and config.inner.pair == (0.8, 0.9)
    assert config.name is None


@pytest.mark.parametrize(
    "data,message",
    [
        ({"cuont": 3}, "unknown config key 'cuont'"),
        ({"inner": {"rat": 1.0}}, "unknown config key 'inner.rat'"),
        ({"count": "three"}, "'count' expects int"),
        ({"count": 2.5}, "'count' expects int"),
        ({"count": True}, "'count' expects int"),
        ({"inner": {"kind": "c"}}, "'inner.kind' must be one of"),
        ({"inner": {"pair": [1.0]}}, "'inner.pair' expects 2 values"),
        ({"inner": 5}, "'inner' must be a mapping"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_overrides_parse_yaml_scalars_and_create_sections():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=true", "d.e=[1, 2]", "f=hello", "g=1e-3"])
    assert data == {"a": {"b": 2, "c": True}, "d": {"e": [1, 2]}, "f": "hello", "g": "1e-3"}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["novalue"])


def test_recipe_value_checks():
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        from_dict(LMRecipe, {"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="val_fraction"):
        from_dict(LMRecipe, {"data": {"val_fraction": 1.5}})
    with pytest.raises(ConfigError, match="'model.positions' must be one of"):
        from_dict(LMRecipe, {"model": {"positions": "sinusoidal"}})


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(listing)


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in Path(__file__).resolve().parents[1].glob("configs/lm-*.yaml"):
        from_dict(LMRecipe, load_yaml(path))


def test_yaml_aliases_are_refused(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("base: &base {lr: 0.1}\ntrain: *base\n")
    with pytest.raises(ConfigError, match=r"YAML aliases are not allowed in configs \(line 2\)"):
        load_yaml(path)
    path.write_text("train: &base {lr: 0.1}\n")  # an anchor that nothing refers to expands nothing
    assert load_yaml(path) == {"train": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="override 'a': YAML aliases are not allowed"):
        apply_overrides({}, ["a=[&x 1, *x]"])


def test_too_deeply_nested_yaml_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="override 'a': the value is nested too deeply"):
        apply_overrides({}, ["a=" + "[" * 5000 + "]" * 5000])


@dataclass
class Bounds:
    ceiling: float = field(default=float("inf"), metadata={FINITE: False})
    rate: float = 0.1


def test_floats_must_be_finite_unless_the_field_says_otherwise():
    assert from_dict(Bounds, {"ceiling": float("inf")}).ceiling == float("inf")
    assert from_dict(Bounds, {"ceiling": "-inf", "rate": "1e-3"}).rate == 1e-3
    for data, key in (({"rate": float("nan")}, "rate"), ({"rate": "inf"}, "rate"), ({"rate": 10**400}, "rate"),
                      ({"inner": {"pair": [0.9, float("nan")]}}, "inner.pair[1]")):
        with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}' must be a finite number"):
            from_dict(Bounds if "inner" not in data else Outer, data)


def test_yaml_no_is_the_string_no_where_the_choices_are_words(tmp_path):
    """YAML 1.1 reads `no` as false: `train.mixed_precision=no` (and `mixed_precision: no` in a file) mean "no"."""
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert from_dict(LMRecipe, load_yaml(path)).train.mixed_precision == "no"
    data = apply_overrides({"train": {"mixed_precision": "bf16"}}, ["train.mixed_precision=no"])
    assert from_dict(LMRecipe, data).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'inner.kind' must be one of 'a' | 'b', got False"):
        from_dict(Outer, {"inner": {"kind": False}})  # no word for false among the choices: still an error

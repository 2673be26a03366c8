from __future__ import annotations  # string annotations: the schema's types must still resolve

import dataclasses
from dataclasses import dataclass, field
import typing
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseopt.experiments.config.load import (ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, merge,
                                            option, to_dict)
from sparseopt.experiments.errors import UserError


@dataclass
class Optim:
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = option(0.1, gt=0, le=1, help="peak learning rate")
    momentum: float = field(default=0.9, metadata={"ge": 0, "lt": 1})
    milestones: list[int] = field(default_factory=lambda: [30, 60])


@dataclass
class Sparsity:
    density: float = option(0.1, gt=0, le=1)
    distribution: Literal["uniform", "erk"] = "erk"
    layer_density: dict[str, float] = option(default_factory=dict, gt=0, le=1)


@dataclass
class Config:
    name: str
    steps: int = option(100, ge=1, help="optimizer steps")
    eval_every: int | None = None
    amp: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    tags: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=lambda: [1.0])
    optim: Optim = field(default_factory=Optim)
    sparsity: Sparsity = field(default_factory=Sparsity)


@dataclass
class Window:
    start: int = 0
    end: int = 10

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")


@dataclass
class Schedule:
    window: Window = field(default_factory=Window)


def errors_of(cls, data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def test_option_puts_bounds_and_help_in_metadata():
    lr = {f.name: f for f in dataclasses.fields(Optim)}["lr"]
    assert dict(lr.metadata) == {"gt": 0, "le": 1, "help": "peak learning rate"}
    assert lr.default == 0.1


def test_valid_nested_dict_builds_the_object_with_defaults():
    cfg = from_dict(Config, {"name": "run", "seeds": [0, 1, 2], "optim": {"name": "adam", "lr": 0.01},
                             "sparsity": {"layer_density": {"fc1": 0.5}}, "eval_every": 50})
    assert cfg == Config(name="run", seeds=[0, 1, 2], eval_every=50, optim=Optim(name="adam", lr=0.01),
                         sparsity=Sparsity(layer_density={"fc1": 0.5}))


def test_numeric_coercions_follow_yaml_habits():
    cfg = from_dict(Config, {"name": "r", "optim": {"lr": "1e-3", "momentum": 0}, "steps": "1e4",
                             "weights": [1, "2.5e-1"], "sparsity": None})
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.optim.momentum == 0.0 and type(cfg.optim.momentum) is float
    assert cfg.steps == 10000 and type(cfg.steps) is int
    assert cfg.weights == [1.0, 0.25]
    assert cfg.sparsity == Sparsity()  # an empty section means defaults


@pytest.mark.parametrize(("data", "expected"), [
    ({"steps": True}, "steps: got True (bool), expected int [optimizer steps]"),
    ({"steps": 2.5}, "steps: got 2.5 (float), expected int [optimizer steps]"),
    ({"amp": 1}, "amp: got 1 (int), expected bool"),
    ({"optim": {"lr": True}}, "optim.lr: got True (bool), expected float [peak learning rate]"),
    ({"name": 3}, "name: got 3 (int), expected str"),
    ({"eval_every": "soon"}, "eval_every: got 'soon' (str), expected int"),
    ({"seeds": 3}, "seeds: got 3 (int), expected a list (list[int])"),
    ({"optim": 0.1}, "optim: expected a mapping of keys to values, got 0.1 (float)"),
])
def test_type_errors_name_key_value_and_expected_type(data, expected):
    assert errors_of(Config, {"name": "r", **data}) == [expected]


def test_range_errors_state_the_range_and_help():
    assert errors_of(Config, {"name": "r", "optim": {"lr": 0}}) == [
        "optim.lr: got 0, expected float with x > 0 and x <= 1 [peak learning rate]"]
    assert errors_of(Config, {"name": "r", "optim": {"momentum": 1.0}}) == [
        "optim.momentum: got 1.0, expected float with x >= 0 and x < 1"]
    assert errors_of(Config, {"name": "r", "steps": 0}) == [
        "steps: got 0, expected int with x >= 1 [optimizer steps]"]
    assert errors_of(Config, {"name": "r", "optim": {"lr": "nan"}})[0].startswith("optim.lr: got 'nan'")
    assert from_dict(Config, {"name": "r", "optim": {"lr": 1}}).optim.lr == 1.0  # bounds are inclusive as declared


def test_bounds_apply_to_every_element_of_containers():
    errors = errors_of(Config, {"name": "r", "sparsity": {"layer_density": {"fc1": 0.5, "fc2": 1.5}}})
    assert errors == ["sparsity.layer_density.fc2: got 1.5, expected float with x > 0 and x <= 1"]


def test_unknown_key_suggests_the_closest_valid_key():
    assert errors_of(Config, {"name": "r", "optim": {"lrr": 0.1}}) == [
        "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"]
    [message] = errors_of(Config, {"name": "r", "optim": {"zzz": 1}})
    assert message == "unknown key 'optim.zzz' (valid keys under 'optim': name, lr, momentum, milestones)"


def test_literal_error_lists_choices_and_suggests():
    assert errors_of(Config, {"name": "r", "sparsity": {"distribution": "erkk"}}) == [
        "sparsity.distribution: got 'erkk' (str), expected one of 'uniform', 'erk' (did you mean 'erk'?)"]


def test_all_errors_are_reported_together():
    errors = errors_of(Config, {"steps": -1, "seeds": [0, "one"], "optim": {"lrr": 0.1, "name": "adamw"},
                                "tags": ["a", 2], "bogus": 1})
    assert len(errors) == 7
    for key in ("steps:", "seeds[1]:", "'optim.lrr'", "optim.name:", "tags[1]:", "'bogus'", "'name'"):
        assert sum(key in line for line in errors) == 1, key


def test_missing_required_key_and_path_prefix():
    assert errors_of(Config, {}) == ["missing required key 'name' (str)"]
    with pytest.raises(ConfigError, match=r"^model\.optim\.lr: got -1"):
        from_dict(Config, {"name": "r", "optim": {"lr": -1}}, path="model")


def test_post_init_value_error_is_reported_with_its_section():
    assert from_dict(Schedule, {"window": {"start": 2, "end": 5}}).window == Window(2, 5)
    assert errors_of(Schedule, {"window": {"start": 5, "end": 5}}) == ["window: end (5) must be after start (5)"]


def test_config_error_is_a_user_error_and_top_level_must_be_a_mapping():
    assert issubclass(ConfigError, UserError)
    assert errors_of(Config, [1, 2]) == ["config: expected a mapping of keys to values, got [1, 2] (list)"]


def test_load_yaml_reads_mappings_and_keeps_floats_usable(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\noptim:\n  lr: 1e-3\nseeds: [1, 2]\n")
    data = load_yaml(path)
    assert data["optim"]["lr"] == "1e-3"  # PyYAML's YAML 1.1 float rule: from_dict has to accept this
    assert from_dict(Config, data).optim.lr == 0.001


def test_load_yaml_errors_are_user_facing(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: run\noptim:\n  lr: [0.1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: malformed YAML: ") as info:
        load_yaml(bad)
    assert "Traceback" not in str(info.value)
    bad.write_text("a: 1\n b: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:3: malformed YAML: mapping values are not allowed here"):
        load_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping.*got list"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(tmp_path)


def test_apply_overrides_parses_values_as_yaml_without_touching_input():
    base = {"name": "r", "optim": {"lr": 0.1}}
    out = apply_overrides(base, ["optim.lr=0.05", "sparsity.distribution=erk", "seeds=[0,1,2]", "amp=true",
                                 "optim.momentum = 0.8"])
    assert out == {"name": "r", "optim": {"lr": 0.05, "momentum": 0.8}, "sparsity": {"distribution": "erk"},
                   "seeds": [0, 1, 2], "amp": True}
    assert base == {"name": "r", "optim": {"lr": 0.1}}
    assert from_dict(Config, out).sparsity.distribution == "erk"
    assert apply_overrides({"optim": None}, ["optim.lr=1e-3"]) == {"optim": {"lr": "1e-3"}}


def test_malformed_overrides_are_all_reported():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr", "optim..lr=1", "optim.lr.x=1", "ok=1", "x=[1"])
    assert len(info.value.errors) == 4
    assert "--set 'optim.lr': expected key.sub=value" in info.value.errors[0]
    assert "--set 'optim..lr=1': expected key.sub=value" in info.value.errors[1]
    assert "'optim.lr' is a value, not a section" in info.value.errors[2]
    assert "cannot parse the value as YAML" in info.value.errors[3]


def test_unknown_override_key_is_caught_by_validation():
    data = apply_overrides({"name": "r"}, ["optim.lrr=0.05"])
    assert errors_of(Config, data) == ["unknown key 'optim.lrr' (did you mean 'optim.lr'?)"]


def test_merge_is_deep_and_does_not_modify_inputs():
    preset = {"optim": {"lr": 0.1, "momentum": 0.9}, "seeds": [0, 1]}
    user = {"optim": {"lr": 0.05}, "seeds": [3], "name": "mine"}
    merged = merge(preset, user)
    assert merged == {"optim": {"lr": 0.05, "momentum": 0.9}, "seeds": [3], "name": "mine"}
    merged["optim"]["momentum"] = 0.0
    merged["seeds"].append(4)
    assert preset == {"optim": {"lr": 0.1, "momentum": 0.9}, "seeds": [0, 1]}
    assert user["seeds"] == [3]
    assert merge({"optim": {"lr": 0.1}}, {"optim": None}) == {"optim": None}


def test_to_dict_requires_an_instance():
    assert to_dict(Optim()) == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "milestones": [30, 60]}
    with pytest.raises(TypeError):
        to_dict(Optim)


@given(lr=st.floats(min_value=1e-12, max_value=1.0), steps=st.integers(1, 10**12),
       density=st.floats(min_value=1e-9, max_value=1.0, exclude_min=False),
       tags=st.lists(st.text(max_size=8), max_size=3), eval_every=st.none() | st.integers(1, 1000))
def test_dump_then_load_round_trips_to_an_equal_object(tmp_path_factory, lr, steps, density, tags, eval_every):
    cfg = Config(name="round trip: 'quoted' ü", steps=steps, eval_every=eval_every, tags=tags, weights=[-0.0, 1e300],
                 optim=Optim(lr=lr), sparsity=Sparsity(density=density, layer_density={"conv.1": density}))
    folder = tmp_path_factory.mktemp("dump")
    dump_yaml(cfg, folder / "config.yaml")
    assert from_dict(Config, load_yaml(folder / "config.yaml")) == cfg
    assert [p.name for p in folder.iterdir()] == ["config.yaml"]  # no temporary left behind


def test_dump_yaml_keeps_schema_order_and_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    dump_yaml(Config(name="a"), path)
    assert [line.split(":")[0] for line in path.read_text().splitlines() if not line.startswith(" ")][:3] == [
        "name", "steps", "eval_every"]
    import yaml

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(yaml, "safe_dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        dump_yaml(Config(name="b"), path)
    monkeypatch.undo()
    assert from_dict(Config, load_yaml(path)).name == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize(("text", "message"), [
    ("name: a\nname: b\n", "key 'name' is given twice (lines 1 and 2); only the last value would be used"),
    ("optim:\n  lr: 0.05\nsteps: 3\noptim:\n  momentum: 0.5\n",
     "key 'optim' is given twice (lines 1 and 4); a repeated section replaces the first one's keys"),
    ("name: r\noptim:\n  lr: 0.05\n  name: sgd\n  lr: 0.1\n", "key 'optim.lr' is given twice (lines 3 and 5)"),
    ("name: r\nseeds: [1]\ntags:\n  - {a: 1, a: 2}\n", "key 'tags[0].a' is given twice (lines 4 and 4)"),
    ("name: r\n'steps': 1\nsteps: 2\n", "key 'steps' is given twice (lines 2 and 3)"),
])
def test_repeated_keys_are_refused_naming_the_key_and_both_lines(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert info.value.errors == [info.value.errors[0]] and message in info.value.errors[0]
    assert str(path) in info.value.errors[0]


def test_merge_keys_and_anchors_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.1, momentum: 0.5}\nname: r\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert load_yaml(path)["optim"] == {"lr": 0.2, "momentum": 0.5}


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "~\n", "---\n"])
def test_empty_or_comment_only_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml is empty .*sparseopt config >"):
        load_yaml(path)


@pytest.mark.parametrize(("data", "expected"), [
    ({"optim": {"lr": float("inf")}}, "optim.lr: got inf, expected a finite number with x > 0 and x <= 1"),
    ({"optim": {"momentum": float("nan")}}, "optim.momentum: got nan, expected a finite number"),
    ({"optim": {"lr": "-inf"}}, "optim.lr: got '-inf', expected a finite number"),
    ({"weights": [1.0, float("inf")]}, "weights[1]: got inf, expected a finite number"),
    ({"steps": float("inf")}, "steps: got inf (float), expected int"),
    ({"sparsity": {"layer_density": {"fc1": float("nan")}}}, "sparsity.layer_density.fc1: got nan, expected a finite"),
])
def test_non_finite_numbers_are_refused_with_their_key(data, expected):
    [message] = errors_of(Config, {"name": "r", **data})
    assert message.startswith(expected)


def test_non_finite_numbers_inside_free_form_values_are_refused():
    @dataclass
    class Free:
        options: dict[str, typing.Any] = field(default_factory=dict)

    assert errors_of(Free, {"options": {"a": [1, float("inf")], "b": {"c": float("nan")}, "d": "inf"}}) == [
        "options.a[1]: got inf, expected a finite number", "options.b.c: got nan, expected a finite number"]


@pytest.mark.parametrize(("data", "hint"), [
    ({"sparsity": {"density": 90}}, "(did you mean 0.9? this is a fraction, not a percentage)"),
    ({"sparsity": {"density": 5}}, "(did you mean 0.05?"),
    ({"optim": {"momentum": 90}}, "(did you mean 0.9?"),
])
def test_a_percentage_where_a_fraction_belongs_gets_a_suggestion(data, hint):
    [message] = errors_of(Config, {"name": "r", **data})
    assert hint in message


@pytest.mark.parametrize("data", [{"sparsity": {"density": 1.5}}, {"sparsity": {"density": 300}},
                                  {"optim": {"lr": -1}}, {"steps": 0}])
def test_no_percentage_suggestion_where_it_would_not_fit(data):
    [message] = errors_of(Config, {"name": "r", **data})
    assert "did you mean" not in message


def test_overrides_refuse_non_finite_and_repeated_keys():
    data = apply_overrides({"name": "r"}, ["optim.lr=inf", "optim.momentum=.nan"])
    assert [e.split(",")[0] for e in errors_of(Config, data)] == ["optim.lr: got 'inf'", "optim.momentum: got nan"]
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice"):
        apply_overrides({}, ["optim={lr: 1, lr: 2}"])

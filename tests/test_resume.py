"""Invariants of the resume check: which config changes a resumed run accepts, for any change."""

import json

import yaml
from helpers import TINY
from hypothesis import given
from hypothesis import strategies as st

from sparseopt.experiments.config.load import from_dict, to_dict
from sparseopt.experiments.errors import UserError
from sparseopt.experiments.run.resume import GROW_ONLY, SAFE_TO_CHANGE, config_changes, plan_resume
from sparseopt.experiments.config.schema import RunConfig

BASE = to_dict(from_dict(RunConfig, TINY))
LEAVES = {f"{section}.{key}": value for section, values in BASE.items() if isinstance(values, dict)
          for key, value in values.items() if isinstance(value, (bool, int, float)) and key != "options"}


def safe(key: str) -> bool:
    return any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in SAFE_TO_CHANGE)


def bumped(value):
    return (not value) if isinstance(value, bool) else value * 2 + 1 if isinstance(value, int) else value * 0.5 + 0.25


@given(keys=st.sets(st.sampled_from(sorted(LEAVES)), min_size=1, max_size=4), shrink=st.booleans())
def test_a_resume_is_refused_exactly_when_an_unsafe_key_changes(tmp_path_factory, keys, shrink):
    folder = tmp_path_factory.mktemp("run")
    (folder / "config.yaml").write_text(yaml.safe_dump(BASE))
    new = json.loads(json.dumps(BASE))
    for key in keys:
        section, name = key.split(".")
        old = LEAVES[key]
        new[section][name] = old - 1 if shrink and key in GROW_ONLY else bumped(old)
    try:
        cfg = from_dict(RunConfig, new)
    except UserError:  # the bump left the key's range: nothing to resume with
        return
    changes = config_changes(BASE, to_dict(cfg))
    assert {k for k, _, _ in changes} == keys  # every change is seen, nothing else is reported
    refused = any(not safe(k) or (k in GROW_ONLY and shrink) for k in keys)
    try:
        plan = plan_resume(folder, cfg)
    except UserError as err:
        assert refused
        for key in keys:  # every refused key is named old -> new
            if not safe(key) or (key in GROW_ONLY and shrink):
                assert f"{key} " in str(err)
    else:
        assert not refused and [k for k, _, _ in plan.changes] == [k for k, _, _ in changes]
    assert [p.name for p in folder.iterdir()] == ["config.yaml"]  # the check itself writes nothing

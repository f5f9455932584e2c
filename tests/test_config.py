"""Configs and knobs: round-trips through JSON, and every bad value is refused with a message
that names the field (or the environment variable) and what is accepted."""

from __future__ import annotations

import json

import pytest
import torch

import optc
from optc import knobs
from optc.config import FRONTENDS, CompileConfig, ConfigError, PassConfig
from optc.passes.fuse_add_norm import FuseAddNormConfig
from optc.passes.registry import PASSES


# ---------------------------------------------------------------- PassConfig


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_pass_config_round_trips_through_json(name: str):
    cls = PASSES[name].config_cls
    cfg = cls(enabled=False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["version"] == cls.VERSION
    assert cls.from_dict(d) == cfg
    assert cls.from_dict({}) == cls()  # missing fields take their defaults


def test_pass_config_to_dict_is_exact():
    cfg = FuseAddNormConfig(rms_norm=False)
    assert cfg.to_dict() == {"enabled": True, "rms_norm": False, "layer_norm": True, "version": 1}
    assert FuseAddNormConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_pass_config_version_mismatch_names_class_and_versions():
    with pytest.raises(ConfigError, match=r"FuseAddNormConfig: config version 2 .* version 1"):
        FuseAddNormConfig.from_dict({"version": 2, "rms_norm": False})


def test_pass_config_unknown_field_is_named_with_accepted_fields():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rms_nrom'\]; accepted: "
                                          r"\['enabled', 'layer_norm', 'rms_norm'\]"):
        FuseAddNormConfig.from_dict({"rms_nrom": False})


def test_config_error_is_a_value_error():
    # callers that already catch ValueError for bad user input keep working
    assert issubclass(ConfigError, ValueError)


def test_pass_config_rejects_wrongly_typed_field():
    with pytest.raises(ConfigError, match="enabled"):
        PassConfig.from_dict({"enabled": "false"})


# ---------------------------------------------------------------- CompileConfig


def test_compile_config_round_trips_through_json_with_every_field_set():
    cfg = CompileConfig(pipeline=("remove_noops",), passes={"fuse_add_norm": {"rms_norm": False}},
                        frontend="export", strict=True, verify=False, plan_memory=False,
                        max_plans=3, fast_guards=False)
    text = cfg.to_json()
    assert json.loads(text) == {
        "pipeline": ["remove_noops"], "passes": {"fuse_add_norm": {"rms_norm": False}},
        "frontend": "export", "strict": True, "verify": False, "plan_memory": False,
        "max_plans": 3, "fast_guards": False, "version": 1,
    }
    assert CompileConfig.from_dict(json.loads(text)) == cfg
    assert CompileConfig.from_dict(CompileConfig().to_dict()) == CompileConfig()


def test_compile_config_pipeline_list_becomes_tuple():
    assert CompileConfig(pipeline=["remove_noops"]).pipeline == ("remove_noops",)
    assert CompileConfig.from_dict({"pipeline": ["remove_noops"]}).pipeline == ("remove_noops",)


def test_compile_config_version_mismatch():
    with pytest.raises(ConfigError, match="CompileConfig version 7; this optc reads 1"):
        CompileConfig.from_dict({"version": 7})


def test_compile_config_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['max_plan'\]; accepted: .*'max_plans'"):
        CompileConfig.from_dict({"max_plan": 2})


def test_invalid_frontend_lists_accepted_frontends():
    with pytest.raises(ConfigError, match=r"CompileConfig.frontend='torchscript'; accepted: .*"
                                          + ".*".join(FRONTENDS)):
        CompileConfig(frontend="torchscript")
    with pytest.raises(ConfigError, match="frontend"):
        CompileConfig.from_dict({"frontend": "jit"})


def test_invalid_max_plans():
    with pytest.raises(ConfigError, match="max_plans must be >= 1"):
        CompileConfig(max_plans=0)


def test_optc_compile_checks_its_config_argument():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="frontend"):
        optc.compile(model, config={"frontend": "nope"})
    with pytest.raises(ConfigError, match="must be an optc.CompileConfig or a dict, got int"):
        optc.compile(model, config=42)
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        optc.compile(lambda x: x)


# ---------------------------------------------------------------- knobs


def test_bad_max_plans_knob_names_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPTC_MAX_PLANS", "lots")
    with pytest.raises(ValueError, match=r"OPTC_MAX_PLANS='lots' is not valid.*memory plans kept"):
        knobs.MAX_PLANS.get()


@pytest.mark.parametrize("knob, raw", [(knobs.STRICT, "maybe"), (knobs.VERIFY, "2"),
                                       (knobs.BISECT_LIMIT, "one")])
def test_bad_knob_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, knob: knobs.Knob, raw: str):
    monkeypatch.setenv(knob.name, raw)
    with pytest.raises(ValueError, match=f"^{knob.name}={raw!r} is not valid"):
        knob.get()


def test_max_plans_knob_refuses_zero(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPTC_MAX_PLANS", "0")
    with pytest.raises(ValueError, match="OPTC_MAX_PLANS"):
        knobs.MAX_PLANS.get()


def test_knob_values_are_parsed_at_call_time(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPTC_MAX_PLANS", raising=False)
    assert knobs.MAX_PLANS.get() == 8
    monkeypatch.setenv("OPTC_MAX_PLANS", "")  # empty means unset
    assert knobs.MAX_PLANS.get() == 8
    monkeypatch.setenv("OPTC_MAX_PLANS", "3")
    assert knobs.MAX_PLANS.get() == 3
    monkeypatch.setenv("OPTC_DISABLE", " remove_noops, ,fuse_add_norm ")
    assert knobs.DISABLE.get() == frozenset({"remove_noops", "fuse_add_norm"})
    monkeypatch.setenv("OPTC_STRICT", "Yes")
    assert knobs.STRICT.get() is True


def test_verify_is_on_under_pytest_unless_overridden(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPTC_VERIFY", raising=False)
    assert knobs.verify_enabled()
    monkeypatch.setenv("OPTC_VERIFY", "0")
    assert not knobs.verify_enabled()


def test_knob_table_is_complete_and_unique():
    names = [k.name for k in knobs.ALL]
    assert len(set(names)) == len(names)
    assert all(n.startswith("OPTC_") or n == "TRITON_INTERPRET" for n in names)
    assert all(k.help for k in knobs.ALL)
    with pytest.raises(AssertionError):
        knobs.log_enabled("no-such-topic")

"""Settings in one place: the dataclasses' defaults are what Hydra composes, their ranges are
what the checks refuse, and sample.py's settings object is what it samples with and records."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ediff_train.cli import register_nodes
from ediff_train.core.settings import check, defaults
from ediff_train.errors import EdiffError
from ediff_train.sampling.settings import SamplerSettings
from ediff_train.training.settings import GROUPS, Module


def _compose(folder: str, name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(str(ROOT / "conf" / folder), version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=False)


def test_train_groups_compose_from_the_dataclasses() -> None:
    register_nodes(["E0_0"])
    cfg = _compose("", "train", ["expert=E0_0", "data=shards"])  # shards: no tuning file
    for group, schema in GROUPS.items():
        assert cfg[group] == defaults(schema), group
    tuned = _compose("", "train", ["expert=E0_0"])  # conf/tuning/digits.yaml still applies
    assert tuned["module"]["lr"] == 4e-4 and tuned["sample"]["guidance"] == 5.0


def test_sampling_config_composes_the_sampler_defaults() -> None:
    cfg = _compose("sampling", "config", [])
    fields = {f.name for f in dataclasses.fields(SamplerSettings)}
    assert {k: cfg[k] for k in fields} == defaults(SamplerSettings)
    assert SamplerSettings.from_config(OmegaConf.create(cfg)) == SamplerSettings()


def test_every_default_passes_its_own_check() -> None:
    for group, schema in GROUPS.items():
        check(defaults(schema), schema, group)
    check(defaults(SamplerSettings), SamplerSettings, "")


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["guidance=abc"], "guidance must be a finite number, got 'abc'"),
        (["order=5"], "order must be a whole number in [1, 4], got 5"),
        (["text=bert"], "text must be one of both, t5, clip, got 'bert'"),
        (["guidance_interval=[1]"], "guidance_interval must be null or [lo, hi], got [1]"),
        (["batch_size=0"], "batch_size must be a whole number ≥ 1, got 0"),
    ],
)
def test_bad_sampler_value_is_one_line(overrides: list[str], line: str) -> None:
    cfg = OmegaConf.create(_compose("sampling", "config", overrides))
    with pytest.raises(EdiffError) as e:
        SamplerSettings.from_config(cfg)
    assert str(e.value) == line


def test_nested_key_is_named_in_full() -> None:
    values = defaults(Module)
    values["lr_schedule"]["decay"] = "linear"
    with pytest.raises(EdiffError) as e:
        check(values, Module, "module")
    assert str(e.value) == (
        "module.lr_schedule.decay must be constant, cosine or inv_sqrt, got 'linear'"
    )


def test_call_and_record_carry_every_setting() -> None:
    s = SamplerSettings(
        steps=7, guidance=3.0, guidance_per_expert={"E1_1": 6}, guidance_interval=[0.1, 2]
    )
    call, record = s.call(), s.record()
    assert call["steps"] == 7 and call["guidance"].per_expert == {"E1_1": 6.0}
    assert call["guidance"].interval == (0.1, 2.0) and "guidance_per_expert" not in call
    assert record["guidance"] == 3.0 and record["guidance_per_expert"] == {"E1_1": 6.0}
    assert set(record) == {f.name for f in dataclasses.fields(SamplerSettings)} - {"progress"}

"""Every scheduler config in conf/ loads into a SchedulerConfig and builds a scheduler."""

from __future__ import annotations

import pathlib

import pytest
import yaml

import controlplane as cp

CONF = pathlib.Path(__file__).resolve().parent.parent / "conf" / "scheduler"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_scheduler_config_file_builds(path):
    values = yaml.safe_load(path.read_text())
    config = cp.SchedulerConfig.from_dict(values)
    sched = cp.Scheduler(config)
    assert sched.stats().num_blocks == config.num_blocks


def test_default_file_matches_the_dataclass_defaults():
    values = yaml.safe_load((CONF / "default.yaml").read_text())
    assert cp.SchedulerConfig.from_dict(values) == cp.SchedulerConfig()


POLICIES = CONF.parent / "policy"


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.stem)
def test_policy_config_file_validates_and_builds(path):
    from sim.config import from_mapping, scheduler_config, validate

    cfg = from_mapping(yaml.safe_load(path.read_text()))  # `# @package _global_`: policy.name, scheduler.*
    validate(cfg)  # imports its policy modules, checks every name is registered
    cp.Scheduler(scheduler_config(cfg, num_blocks=64, num_host_blocks=8))


def test_the_servers_engine_node_is_engine_config_with_its_defaults():
    # issue #19: the node was a plain dict, so `engine.ordering=...` needed a `+`
    import dataclasses

    from omegaconf import OmegaConf

    from engine.config import EngineConfig
    from engine.serve.__main__ import ServeConfig

    node = OmegaConf.to_container(OmegaConf.structured(ServeConfig))["engine"]
    assert set(node) == {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "scheduler"}
    assert EngineConfig.from_dict(node) == EngineConfig()
    served = yaml.safe_load((CONF.parents[1] / "engine" / "serve" / "conf" / "config.yaml").read_text())["engine"]
    assert EngineConfig.from_dict({**node, **served}) == EngineConfig.from_dict(served)

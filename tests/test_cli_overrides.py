"""Command lines as users type them (issue #19): policy specs with parameters unquoted, and every
EngineConfig field settable as `engine.KEY=VALUE` on the server without `+`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from controlplane.cli import hydra_overrides, split_spec_sweep


def cfg_job(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module ARGS --cfg job`: what Hydra composes from the command line, nothing run."""
    return subprocess.run(
        [sys.executable, "-m", module, *args, "--cfg", "job"], text=True, capture_output=True, timeout=120
    )


def composed(module: str, *args: str) -> dict:
    done = cfg_job(module, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return yaml.safe_load(done.stdout)


def test_policy_specs_with_parameters_are_quoted_and_everything_hydra_reads_is_kept():
    assert hydra_overrides(
        [
            "scheduler.eviction=ttl:ttl=30",
            "scheduler.eviction=pause_aware:reload_s_per_token=1,margin=1",
            "-m",
            "policy=lru,ttl",
            "scheduler.eviction=lru,ttl:ttl=5,pause_aware:reload_s_per_token=1,margin=1",
            "'scheduler.policy_modules=[controlplane.examples]'",
            "scheduler.policy_modules=[controlplane.examples]",
            "hydra/launcher=joblib",
            "scheduler.eviction='ttl:ttl=5'",
            "cluster.router=most_free_kv",
            "sim.seed=range(0,4)",
            "out=${now:%H}",
            "x=a=b",
            "--cfg",
            "job",
        ]
    ) == [
        "scheduler.eviction='ttl:ttl=30'",
        "scheduler.eviction='pause_aware:reload_s_per_token=1,margin=1'",
        "-m",
        "policy=lru,ttl",
        "scheduler.eviction=lru,'ttl:ttl=5','pause_aware:reload_s_per_token=1,margin=1'",
        "'scheduler.policy_modules=[controlplane.examples]'",
        "scheduler.policy_modules=[controlplane.examples]",
        "hydra/launcher=joblib",
        "scheduler.eviction='ttl:ttl=5'",
        "cluster.router=most_free_kv",
        "sim.seed=range(0,4)",
        "out=${now:%H}",
        "x='a=b'",
        "--cfg",
        "job",
    ]
    assert split_spec_sweep("lru,ttl:ttl=5,pause_aware:a=1,b=2") == ["lru", "ttl:ttl=5", "pause_aware:a=1,b=2"]


def test_plus_on_an_existing_key_and_new_keys_of_a_mapping_are_read_as_hydra_needs():
    existing, mappings = {"engine.load_format", "engine.kernel_overrides"}, {"engine.kernel_overrides"}
    assert hydra_overrides(
        [
            "+engine.load_format=dummy",
            "+engine.foo=1",
            "engine.kernel_overrides={a:[torch]}",
            "engine.kernel_overrides.b=[triton]",
            "++engine.kernel_overrides.c=[jax]",
        ],
        existing,
        mappings,
    ) == [
        "engine.load_format=dummy",
        "+engine.foo=1",
        "++engine.kernel_overrides={a:[torch]}",
        "++engine.kernel_overrides.b=[triton]",
        "++engine.kernel_overrides.c=[jax]",
    ]


def test_readme_server_command_sets_engine_options_without_plus():
    # README: python -m engine.serve scheduler.ordering=short_prefill_first 'scheduler.policy_modules=[...]'
    # (the engine's node was a plain dict once, needing `+`; the scheduler's own keys are scheduler.KEY)
    cfg = composed(
        "engine.serve",
        "scheduler.ordering=short_prefill_first",
        "scheduler.policy_modules=[controlplane.examples]",
        "scheduler.eviction=ttl:ttl=30",
        "scheduler.max_model_len=4096",
        "+engine.load_format=dummy",
        "engine.kernel_overrides={rms_norm:[torch]}",
    )
    from engine.config import EngineConfig

    engine, scheduler = cfg["engine"], cfg["scheduler"]
    assert (scheduler["ordering"], scheduler["policy_modules"], scheduler["eviction"]) == (
        "short_prefill_first",
        ["controlplane.examples"],
        "ttl:ttl=30",
    )
    assert (scheduler["max_model_len"], engine["load_format"], engine["kernel_overrides"]) == (
        4096,
        "dummy",
        {"rms_norm": ["torch"]},
    )
    built = EngineConfig.from_dict({"model": cfg["model"], **engine, "scheduler": scheduler})  # what serve() builds
    assert built.scheduler.policy_modules == ("controlplane.examples",) and built.scheduler.idle_chunk_size is None
    defaults = {k: v for k, v in engine.items() if k not in ("load_format", "kernel_overrides")}
    assert {k: getattr(built, k) for k in defaults} == {k: getattr(EngineConfig(), k) for k in defaults}


@pytest.mark.parametrize(
    "arg, message",
    [
        (
            "engine.no_such_option=1",
            "unknown engine option 'engine.no_such_option' in 'engine.no_such_option=1': "
            "engine.KEY is one of ['cuda_graph_batch_sizes', ",
        ),
        ("+engine.no_such_option=1", "unknown engine option 'engine.no_such_option' in '+engine.no_such_option=1'"),
        (
            "engine.model=x",
            "unknown engine option 'engine.model' in 'engine.model=x': the model is the top-level model=...",
        ),
    ],
)
def test_unknown_engine_keys_are_refused_with_the_known_ones(arg, message):
    done = cfg_job("engine.serve", arg)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_a_bad_engine_value_is_refused_by_type():
    done = cfg_job("engine.serve", "scheduler.max_model_len=many")
    assert done.returncode != 0 and "scheduler.max_model_len" in done.stderr


def test_fidelity_takes_engine_options_and_specs_as_typed():
    cfg = composed("experiments.fidelity", "engine.eviction=ttl:ttl=5", "engine.enforce_eager=true")
    assert cfg["engine"] == {"eviction": "ttl:ttl=5", "enforce_eager": True}


def test_simulate_takes_a_policy_spec_with_parameters_unquoted():
    # needs experiments/simulate.py to call controlplane.cli.fix_sys_argv() before main()
    cfg = composed("experiments.simulate", "scheduler.eviction=ttl:ttl=5", "cluster.router=round_robin")
    assert cfg["scheduler"]["eviction"] == "ttl:ttl=5"

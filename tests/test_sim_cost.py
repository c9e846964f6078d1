"""Step-cost models and the specs they read (sim/specs.py, sim/cost.py; the fitted model: test_profile_cost.py).

Most expected costs are worked out by hand below for a tiny invented model on
an invented machine with round numbers:

    TINY: 1 layer, hidden 8, 2 heads, 1 KV head, head_dim 4, intermediate 16,
          vocab 32, 1 byte per element, untied
    SLOW: 500 FLOP/s, 100 B/s memory, 10 B/s host link, no overhead

    matmul   in -> out   weights   in+out   2*in*out (FLOPs per token)
    qkv       8 -> 16       128      24       256      (16 = (2 + 2*1) heads * 4)
    o         8 -> 8         64      16       128
    gate_up   8 -> 32       256      40       512
    down     16 -> 8        128      24       256
    lm_head   8 -> 32       256      40       512      (sampled rows only)
    sum of the four layer matmuls: 576 weights; with lm_head 832

    attention: 4*heads*head_dim = 32 FLOPs per (query, key) pair;
               kv_bytes_per_token = 2 * 1 layer * 1 kv head * 4 * 1 byte = 8
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import yaml

import controlplane as cp
from sim import specs
from sim.cost import FEATURES, PlanFeatures, RooflineCost, make_cost_model
from sim.specs import HardwareSpec, ModelSpec, kv_capacity_blocks, load_hardware_spec, load_model_spec

TINY = ModelSpec(
    name="tiny",
    num_layers=1,
    hidden_size=8,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate_size=16,
    vocab_size=32,
    dtype_bytes=1,
)
SLOW = HardwareSpec(name="slow", peak_flops=500, mem_bandwidth=100, mem_bytes=1e6, host_link_bandwidth=10)


def plan(**features) -> types.SimpleNamespace:
    """A stand-in for a control-plane Plan: every feature 0 unless given, block_size 4."""
    values = {f: 0 for f in FEATURES} | {"block_size": 4}
    return types.SimpleNamespace(**(values | features))


def reference_roofline(model: ModelSpec, hw: HardwareSpec, p) -> float:
    """The roofline straight from its definition, one operation at a time."""
    if p.num_tokens == 0 and p.num_swap_out_blocks + p.num_swap_in_blocks == 0:
        return 0.0
    db, peak, bw = model.dtype_bytes, hw.peak_flops, hw.mem_bandwidth
    t = p.num_tokens
    linear = (
        sum(max(2 * t * i * o / peak, (i * o + t * (i + o)) * db / bw) for _, i, o in model.layer_matmuls())
        if t
        else 0.0
    )
    h, v, s = model.hidden_size, model.vocab_size, p.num_sampled
    head = max(2 * s * h * v / peak, (h * v + s * (h + v)) * db / bw) if s and t else 0.0
    attn = max(
        4 * model.num_heads * model.head_dim * p.attn_pairs / peak,
        p.kv_read_tokens * 2 * model.num_kv_heads * model.head_dim * db / bw,
    )
    copies = (p.num_swap_out_blocks + p.num_swap_in_blocks) * model.kv_bytes_per_token() * p.block_size
    return model.num_layers * (linear + attn) + head + copies / hw.host_link_bandwidth + hw.step_overhead_s


# --- specs -------------------------------------------------------------------------------------


def test_tiny_model_counts():
    # embeddings 32*8=256; layer: q 64 + k 32 + v 32 + o 64 + MLP 3*8*16=384 + norms 16 = 592;
    # final norm 8; lm_head 256 -> 1112
    assert TINY.num_params() == 1112
    assert TINY.weight_bytes() == 1112
    assert TINY.kv_bytes_per_token() == 8
    tied = ModelSpec(**{**TINY.__dict__, "tie_word_embeddings": True, "dtype_bytes": 2})
    assert tied.num_params() == 1112 - 256
    assert tied.weight_bytes() == 2 * (1112 - 256)


@pytest.mark.parametrize(
    "name, published",
    [
        ("llama3_8b", 8.03e9),
        ("llama3_70b", 70.55e9),
        ("llama3_2_1b", 1.24e9),
        ("qwen3_8b", 8.19e9),
        ("smollm2_135m", 1.35e8),
    ],
)
def test_real_model_param_counts_match_published_figures(name, published):
    assert load_model_spec(name).num_params() == pytest.approx(published, rel=0.01)


def test_llama3_8b_kv_bytes_per_token():
    # 2 (K and V) * 32 layers * 8 kv heads * 128 * 2 bytes
    assert load_model_spec("llama3_8b").kv_bytes_per_token() == 131072


def test_kv_capacity_llama3_8b_on_h100():
    model, hw = load_model_spec("llama3_8b"), load_hardware_spec("h100_sxm")
    blocks = kv_capacity_blocks(model, hw, block_size=16)
    reserve = specs.DEFAULT_ACTIVATION_RESERVE_BYTES
    assert blocks == int((80e9 * 0.9 - model.weight_bytes() - reserve) // (131072 * 16))
    assert 25_000 < blocks < 27_000  # ~ (72 - 16.1 - 1.1) GB / 2 MiB
    assert kv_capacity_blocks(model, hw, 16, activation_reserve_bytes=0) > blocks


def test_model_that_does_not_fit_is_rejected_by_name():
    small = HardwareSpec(name="gpu8", peak_flops=1e14, mem_bandwidth=1e12, mem_bytes=8e9, host_link_bandwidth=1e10)
    with pytest.raises(ValueError, match=r"model llama3_8b needs 16\.1 GB of weights; gpu8 has 7\.2 GB"):
        kv_capacity_blocks(load_model_spec("llama3_8b"), small, 16)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 0},
        {"block_size": 16, "gpu_memory_utilization": 1.5},
        {"block_size": 16, "activation_reserve_bytes": -1},
    ],
)
def test_kv_capacity_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        kv_capacity_blocks(TINY, SLOW, **kwargs)


@pytest.mark.parametrize("group", ["model", "hardware"])
def test_every_conf_file_loads_and_its_name_is_its_file_name(group):
    loader = load_model_spec if group == "model" else load_hardware_spec
    paths = sorted((specs.CONF_DIR / group).glob("*.yaml"))
    assert paths
    for path in paths:
        assert loader(path.stem).name == path.stem
        assert loader(path) == loader(path.stem)


def test_hardware_conf_files_say_where_their_numbers_come_from():
    assert load_hardware_spec("h100_sxm").source.startswith("datasheet")
    assert load_hardware_spec("h200").source.startswith("datasheet")
    assert "estimate" in load_hardware_spec("cpu").source


def test_unknown_and_missing_yaml_keys_are_rejected(tmp_path):
    values = yaml.safe_load((specs.CONF_DIR / "model" / "llama3_8b.yaml").read_text())
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values | {"rope_theta": 5e5, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['n_layer', 'rope_theta'\]"):
        load_model_spec(path)
    del values["vocab_size"]
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match=r"missing keys \['vocab_size'\]"):
        load_model_spec(path)


def test_unknown_spec_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown hardware 'tpu'; known: \['cpu', 'h100_sxm', 'h200'\]"):
        load_hardware_spec("tpu")


def test_yaml_float_without_signed_exponent_gets_a_hint(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text(
        "name: x\npeak_flops: 1e15\nmem_bandwidth: 1.0e+12\nmem_bytes: 1.0e+9\nhost_link_bandwidth: 1.0e+9\n"
    )
    with pytest.raises(ValueError, match="peak_flops must be a number, got '1e15'.*signed exponent"):
        load_hardware_spec(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_layers": 0}, "model tiny: num_layers must be a positive integer"),
        ({"head_dim": 4.0}, "model tiny: head_dim must be a positive integer"),
        ({"vocab_size": True}, "model tiny: vocab_size must be a positive integer"),
        ({"num_kv_heads": 3}, r"model tiny: num_heads \(2\) must be a multiple of num_kv_heads \(3\)"),
        ({"tie_word_embeddings": "no"}, "model tiny: tie_word_embeddings must be true or false"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
def test_invalid_model_spec_values_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**(TINY.__dict__ | change))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mem_bandwidth": 0}, "hardware slow: mem_bandwidth must be finite and > 0"),
        ({"peak_flops": float("inf")}, "hardware slow: peak_flops must be finite and > 0"),
        ({"step_overhead_s": -1e-3}, "hardware slow: step_overhead_s must be finite and >= 0"),
        ({"host_link_bandwidth": "fast"}, "hardware slow: host_link_bandwidth must be a number"),
    ],
)
def test_invalid_hardware_spec_values_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        HardwareSpec(**(SLOW.__dict__ | change))


# --- roofline ----------------------------------------------------------------------------------


def test_one_token_decode_is_memory_bound():
    # c = 9 cached, q = 1: attn_pairs = 9 + 1 = 10, kv_read_tokens = 10.
    # At T = 1 every matmul is memory bound (FLOPs/500 < bytes/100), e.g. qkv 256/500 < 152/100:
    #   weights (832 B) + activations (24+16+40+24 + lm_head 40 = 144 B) = 976 B / 100 = 9.76 s
    #   attention: FLOPs 32*10/500 = 0.64 s < KV reads 10*8 B/100 = 0.8 s          -> 0.8 s
    # total 10.56 s
    cost = RooflineCost(TINY, SLOW)
    decode = PlanFeatures.of_requests([9], [1], block_size=4)
    assert (decode.attn_pairs, decode.kv_read_tokens) == (10, 10)
    assert cost.step_seconds(decode) == pytest.approx(10.56, rel=1e-12)
    assert cost.lower_bound_decode_seconds(9) == pytest.approx(10.56, rel=1e-12)


def test_large_prefill_is_compute_bound():
    # c = 0, q = 100: attn_pairs = 100*101/2 = 5050, kv_read_tokens = 100, one row sampled.
    #   layer matmuls: 2 * 576 params * 100 tokens / 500 = 230.4 s (memory: (576 + 100*104)/100 = 109.76)
    #   lm_head, 1 row: memory bound, (256 + 40)/100 = 2.96 s
    #   attention: 32 * 5050 / 500 = 323.2 s (memory: 100*8/100 = 8 s)
    # total 556.56 s
    cost = RooflineCost(TINY, SLOW)
    assert cost.lower_bound_prefill_seconds(100) == pytest.approx(556.56, rel=1e-12)


def test_mid_prefill_chunk_without_sampling_skips_the_lm_head():
    # the prefill above minus the lm_head's 2.96 s
    chunk = PlanFeatures.of_requests([0], [100], num_sampled=0)
    assert RooflineCost(TINY, SLOW).step_seconds(chunk) == pytest.approx(556.56 - 2.96, rel=1e-12)


def test_kv_copies_cost_their_bytes_over_the_host_link():
    # 3 blocks * 4 tokens * 8 B = 96 B over 10 B/s = 9.6 s
    cost = RooflineCost(TINY, SLOW)
    assert cost.step_seconds(plan(num_swap_out_blocks=2, num_swap_in_blocks=1)) == pytest.approx(9.6)
    with_decode = plan(num_tokens=1, num_reqs=1, num_sampled=1, attn_pairs=10, kv_read_tokens=10, num_swap_in_blocks=3)
    assert cost.step_seconds(with_decode) == pytest.approx(10.56 + 9.6, rel=1e-12)


def test_step_overhead_adds_to_every_non_empty_step():
    cost = RooflineCost(TINY, HardwareSpec(**(SLOW.__dict__ | {"step_overhead_s": 0.5})))
    assert not cost.is_physical_limit and RooflineCost(TINY, SLOW).is_physical_limit
    assert cost.lower_bound_decode_seconds(9) == pytest.approx(10.56 + 0.5, rel=1e-12)
    assert cost.step_seconds(plan(num_swap_out_blocks=3)) == pytest.approx(9.6 + 0.5)
    assert cost.step_seconds(plan()) == 0.0


def test_empty_plan_costs_nothing():
    assert RooflineCost(TINY, SLOW).step_seconds(plan()) == 0.0
    assert RooflineCost(load_model_spec("llama3_8b"), load_hardware_spec("h100_sxm")).step_seconds(plan()) == 0.0


@pytest.mark.parametrize("model, hw", [("llama3_8b", "h100_sxm"), ("smollm2_135m", "cpu"), (TINY, SLOW)])
def test_roofline_equals_its_definition_operation_by_operation(model, hw):
    model = load_model_spec(model) if isinstance(model, str) else model
    hw = load_hardware_spec(hw) if isinstance(hw, str) else hw
    cost = RooflineCost(model, hw)
    rng = np.random.default_rng(0)
    for tokens in [*range(1, 40), 64, 127, 128, 300, 513, 2048, 8192]:
        # up to 8 requests: decodes plus one prefill chunk taking the rest of the tokens
        num_reqs = min(tokens, int(rng.integers(1, 9)))
        queries = [1] * (num_reqs - 1) + [tokens - num_reqs + 1]
        cached = rng.integers(0, 5000, size=num_reqs).tolist()
        p = PlanFeatures.of_requests(cached, queries, block_size=16)
        p = PlanFeatures(**(p.__dict__ | {"num_swap_out_blocks": tokens % 3}))
        assert cost.step_seconds(p) == pytest.approx(reference_roofline(model, hw, p), rel=1e-12)


def test_roofline_is_monotonic_in_tokens_and_in_context():
    cost = RooflineCost(load_model_spec("llama3_8b"), load_hardware_spec("h100_sxm"))
    prefill = [cost.lower_bound_prefill_seconds(t) for t in range(1, 1200)]
    decode = [cost.lower_bound_decode_seconds(c) for c in range(0, 6000, 7)]
    assert all(a < b for a, b in zip(prefill, prefill[1:]))
    assert all(a < b for a, b in zip(decode, decode[1:]))
    # at the physical limit a decode reads every non-embedding weight once: >= 15 GB / 3.35 TB/s
    assert 4.4e-3 < decode[0] < 4.6e-3


def test_plan_features_agree_with_the_control_plane_plan():
    sched = cp.Scheduler(cp.SchedulerConfig(num_blocks=64, block_size=16, chunk_size=32, max_num_batched_tokens=48))
    sched.add_request(1, list(range(40)), max_new_tokens=4)
    sched.add_request(2, list(range(100, 110)), max_new_tokens=4)
    real = sched.step(now=0.0)
    mine = PlanFeatures.of_requests(
        real.cached_lens.tolist(), real.query_lens.tolist(), num_sampled=int(real.sample.sum()), block_size=16
    )
    assert {f: getattr(real, f) for f in FEATURES} == {f: getattr(mine, f) for f in FEATURES}


# --- factory -----------------------------------------------------------------------------------


def test_make_cost_model():
    assert isinstance(make_cost_model("roofline", TINY, SLOW), RooflineCost)
    with pytest.raises(ValueError, match=r"unknown cost model 'vidur'; known: \['profile', 'roofline'\]"):
        make_cost_model("vidur", TINY, SLOW)

"""The twin's FP8 (issue #16): `model.kv_cache_dtype` and `model.quantization` in the simulator.

Expected values are worked out here from the published shapes and datasheet rates, not by the
code under test:

Llama-3-8B (L=32, hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab 128256, untied)
    linear weights per layer: qkv 4096*6144 + o 4096*4096 + gate_up 4096*28672 + down 14336*4096
                              = 218,103,808; all layers 6,979,321,856
    output channels per layer: 6144 + 4096 + 28672 + 4096 = 43,008; all layers 1,376,256
    other weights (embedding, LM head, norms): 2*128256*4096 + 2*32*4096 + 4096 = 1,050,939,392
    bf16:  (6,979,321,856 + 1,050,939,392) * 2                        = 16,060,522,496 bytes
    fp8:   6,979,321,856 * 1 + 1,376,256 * 4 + 1,050,939,392 * 2      =  9,086,705,664 bytes
    KV per token: auto 2*32*8*128*2 = 131,072; fp8_e4m3 2*32*8*(128*1 + 4) = 67,584
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from sim.cost import PlanFeatures, RooflineCost, _sum_of_max_pieces, make_cost_model, shipped_profile_path
from sim.profile_cost import ProfileCost
from sim.simulation import Simulation
from sim.specs import KV_CACHE_DTYPES, QUANTIZATIONS, kv_capacity_blocks, load_hardware_spec, load_model_spec

from helpers import run_simulate_app

LLAMA = load_model_spec("llama3_8b")
H100 = load_hardware_spec("h100_sxm")
FP8_KV = dataclasses.replace(LLAMA, kv_cache_dtype="fp8_e4m3")
FP8_W = dataclasses.replace(LLAMA, quantization="fp8")
FP8_BOTH = dataclasses.replace(LLAMA, kv_cache_dtype="fp8_e4m3", quantization="fp8")

# Llama-3-8B by hand (module docstring).
L, HID, HEADS, KVH, HD, MLP, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
MATMULS = ((HID, (HEADS + 2 * KVH) * HD), (HEADS * HD, HID), (HID, 2 * MLP), (MLP, HID))
LINEAR_PARAMS = L * sum(i * o for i, o in MATMULS)
OUT_CHANNELS = L * sum(o for _, o in MATMULS)
OTHER_PARAMS = 2 * VOCAB * HID + 2 * L * HID + HID
GiB = 1 << 30
WALL_CLOCK = {"wall_seconds", "steps_per_wall_s", "requests_per_wall_min"}


def test_the_hand_numbers_are_the_published_ones():
    assert (LINEAR_PARAMS, OUT_CHANNELS, OTHER_PARAMS) == (6_979_321_856, 1_376_256, 1_050_939_392)
    assert LINEAR_PARAMS + OTHER_PARAMS == 8_030_261_248  # Llama-3-8B's 8.03B parameters


def test_the_twin_takes_the_engines_names():
    engine_config = pytest.importorskip("engine.config")
    assert KV_CACHE_DTYPES == engine_config.KV_CACHE_DTYPES
    assert QUANTIZATIONS == engine_config.QUANTIZATIONS


# -- bytes -------------------------------------------------------------------------------------------


def test_weight_and_kv_bytes_follow_the_storage():
    assert LLAMA.weight_bytes() == 16_060_522_496 == LLAMA.num_params() * 2
    assert FP8_W.weight_bytes() == 9_086_705_664 == LINEAR_PARAMS + 4 * OUT_CHANNELS + 2 * OTHER_PARAMS
    assert FP8_KV.weight_bytes() == LLAMA.weight_bytes() and FP8_BOTH.weight_bytes() == FP8_W.weight_bytes()
    assert LLAMA.kv_bytes_per_token() == FP8_W.kv_bytes_per_token() == 131_072
    assert FP8_KV.kv_bytes_per_token() == FP8_BOTH.kv_bytes_per_token() == 67_584 == 2 * L * KVH * (HD + 4)
    # bytes per element as the spec carries them
    assert (LLAMA.linear_weight_dtype_bytes, LLAMA.linear_scale_bytes, LLAMA.kv_dtype_bytes, LLAMA.kv_scale_bytes) == (
        2,
        0,
        2,
        0,
    )
    assert (
        FP8_BOTH.linear_weight_dtype_bytes,
        FP8_BOTH.linear_scale_bytes,
        FP8_BOTH.kv_dtype_bytes,
        FP8_BOTH.kv_scale_bytes,
    ) == (1, 4, 1, 4)


def test_a_tied_lm_head_is_the_embedding_and_stays_at_the_model_dtype():
    small = dataclasses.replace(load_model_spec("llama3_2_1b"), quantization="fp8")  # tied embeddings
    layers, hid, inter, vocab = 16, 2048, 8192, 128256
    mats = ((hid, (32 + 2 * 8) * 64), (32 * 64, hid), (hid, 2 * inter), (inter, hid))
    linear = layers * sum(i * o for i, o in mats)
    outs = layers * sum(o for _, o in mats)
    other = vocab * hid + 2 * layers * hid + hid  # one embedding table, no separate head
    assert small.weight_bytes() == linear + 4 * outs + 2 * other


# -- KV capacity -------------------------------------------------------------------------------------


def test_fp8_kv_about_doubles_the_kv_capacity():
    budget = 80e9 * 0.9 - GiB
    bf16 = int((budget - 16_060_522_496) // (131_072 * 16))
    fp8_kv = int((budget - 16_060_522_496) // (67_584 * 16))
    both = int((budget - 9_086_705_664) // (67_584 * 16))
    assert (bf16, fp8_kv, both) == (26_162, 50_738, 57_187)
    assert kv_capacity_blocks(LLAMA, H100, 16) == bf16
    assert kv_capacity_blocks(FP8_KV, H100, 16) == fp8_kv
    assert kv_capacity_blocks(FP8_BOTH, H100, 16) == both
    assert 1.9 < fp8_kv / bf16 < 2.0  # not quite 2: the scales take 4 of every 132 bytes


def test_the_simulation_sizes_both_kv_tiers_with_the_scales():
    cfg = {
        "model": dataclasses.asdict(FP8_KV),
        "hardware": dataclasses.asdict(H100),
        "engine": {"host_kv_gb": 10.0},
        "sim": {"num_sessions": 1},
    }
    sim = Simulation(cfg)
    assert sim.num_blocks == 50_738
    assert sim.num_host_blocks == int(10e9 // (67_584 * 16))


# -- the roofline ------------------------------------------------------------------------------------


def decode_bytes(weight_dtype: int, weight_scale: int, kv_per_token: int, context: int) -> int:
    """Bytes a one-request decode step moves, everything memory bound: the linear layers' weights
    (+ scales) and bf16 activations, the bf16 LM head and its activations, the KV read."""
    linear = L * sum(i * o * weight_dtype + o * weight_scale + (i + o) * 2 for i, o in MATMULS)
    head = HID * VOCAB * 2 + (HID + VOCAB) * 2
    return linear + head + (context + 1) * kv_per_token


@pytest.mark.parametrize(
    "model, wb, sb, kv",
    [(LLAMA, 2, 0, 131_072), (FP8_KV, 2, 0, 67_584), (FP8_W, 1, 4, 131_072), (FP8_BOTH, 1, 4, 67_584)],
    ids=["bf16", "fp8_kv", "fp8_weights", "fp8_both"],
)
def test_roofline_decode_at_50k_is_its_bytes_over_the_bandwidth(model, wb, sb, kv):
    seconds = RooflineCost(model, H100).lower_bound_decode_seconds(50_000)
    assert seconds == pytest.approx(decode_bytes(wb, sb, kv, 50_000) / 3.35e12, rel=1e-12)


def test_roofline_decode_at_50k_with_both_fp8_options_is_under_0_6_of_bf16():
    bf16 = decode_bytes(2, 0, 131_072, 50_000) / 3.35e12  # 21.6 GB: 6.4 ms
    fp8 = decode_bytes(1, 4, 67_584, 50_000) / 3.35e12  # 11.4 GB: 3.4 ms
    assert fp8 / bf16 < 0.6
    ratio = RooflineCost(FP8_BOTH, H100).lower_bound_decode_seconds(50_000) / RooflineCost(
        LLAMA, H100
    ).lower_bound_decode_seconds(50_000)
    assert ratio == pytest.approx(fp8 / bf16, rel=1e-12) and ratio < 0.6


def prefill_seconds(linear_peak: float, q: int) -> float:
    """One prefill of q tokens from scratch, q large enough that every linear layer is compute bound;
    attention at the bf16 rate (compute bound too), the LM head on one sampled row (memory bound)."""
    linear = sum(2 * q * i * o * L for i, o in MATMULS) / linear_peak
    attention = L * 4 * HEADS * HD * (q * (q + 1) // 2) / 9.894e14
    head = (HID * VOCAB * 2 + (HID + VOCAB) * 2) / 3.35e12
    return linear + attention + head


def test_fp8_weights_run_the_linear_layers_at_the_fp8_rate_and_attention_at_bf16():
    assert H100.peak_flops_fp8 == 2 * H100.peak_flops == 1.9788e15
    q = 8192
    for model, peak in ((LLAMA, 9.894e14), (FP8_KV, 9.894e14), (FP8_W, 1.9788e15)):
        got = RooflineCost(model, H100).lower_bound_prefill_seconds(q)
        assert got == pytest.approx(prefill_seconds(peak, q), rel=1e-12), model.label
    # A hardware entry without an FP8 rate prices FP8 matmuls at its one rate, and says so.
    no_rate = dataclasses.replace(H100, name="gpu_no_fp8", peak_flops_fp8=None)
    cost = RooflineCost(FP8_W, no_rate)
    assert cost.lower_bound_prefill_seconds(q) == pytest.approx(prefill_seconds(9.894e14, q), rel=1e-12)
    assert "no hardware.peak_flops_fp8" in cost.describe()
    assert "(fp8)" in RooflineCost(FP8_W, H100).describe()


def test_swaps_move_the_scales_too():
    plan = PlanFeatures(num_swap_out_blocks=3, block_size=16)
    assert RooflineCost(FP8_KV, H100).step_seconds(plan) == pytest.approx(3 * 16 * 67_584 / 6.4e10, rel=1e-12)


def test_default_roofline_coefficients_are_the_former_formula_bit_for_bit():
    cost = RooflineCost(LLAMA, H100)
    layers, db, peak, bw = 32, 2, H100.peak_flops, H100.mem_bandwidth
    breaks, pieces = _sum_of_max_pieces(
        (layers * 2 * i * o / peak, layers * i * o * db / bw, layers * (i + o) * db / bw) for i, o in MATMULS
    )
    assert (cost._linear_breaks, cost._linear_pieces) == (breaks, pieces)
    assert cost._attn_kv_s == 2 * layers * KVH * HD * db / bw
    assert cost._swap_token_s == 2 * layers * KVH * HD * db / H100.host_link_bandwidth


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kv_cache_dtype": "fp16"}, "model llama3_8b: kv_cache_dtype must be one of auto, fp8_e4m3, got 'fp16'"),
        ({"quantization": "int4"}, "model llama3_8b: quantization must be one of none, fp8, got 'int4'"),
    ],
)
def test_a_spec_with_a_bad_storage_value_is_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(LLAMA, **change)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"kv_cache_dtype": "fp8"}, r"model.kv_cache_dtype must be one of auto, fp8_e4m3, got 'fp8'"),
        ({"quantization": "fp8_e4m3"}, r"model.quantization must be one of none, fp8, got 'fp8_e4m3'"),
    ],
)
def test_a_config_with_a_bad_storage_value_fails_before_the_run(model, message):
    with pytest.raises(ValueError, match=message):
        Simulation({"model": model, "sim": {"num_sessions": 1}})


def test_a_bad_fp8_rate_is_rejected():
    with pytest.raises(ValueError, match="hardware h100_sxm: peak_flops_fp8 must be finite and > 0"):
        dataclasses.replace(H100, peak_flops_fp8=-1.0)


def test_a_bf16_profile_refuses_an_fp8_model_and_an_fp8_profile_takes_it(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"measured on an engine with kv_cache_dtype=auto, quantization=none, "
        r"but model llama3_8b is simulated with kv_cache_dtype=fp8_e4m3.*"
        r"cost=roofline",
    ):
        Simulation({"model": {"kv_cache_dtype": "fp8_e4m3"}, "sim": {"cost_model": "profile", "num_sessions": 1}})
    with pytest.raises(ValueError, match="quantization=none, but .* quantization=fp8"):
        make_cost_model("profile", FP8_W, H100)
    # A profile whose header says it measured FP8 storage prices that storage, and only that.
    saved = json.loads(shipped_profile_path("llama3_8b", "h100_sxm").read_text())
    saved["meta"].update(kv_cache_dtype="fp8_e4m3", quantization="fp8")
    path = tmp_path / "fp8.json"
    path.write_text(json.dumps(saved))
    make_cost_model("profile", FP8_BOTH, H100, path)
    with pytest.raises(ValueError, match="kv_cache_dtype=fp8_e4m3, quantization=fp8, but"):
        ProfileCost.load(path).check_model(LLAMA)


def small_run(**model) -> dict:
    return {
        "model": {**dataclasses.asdict(load_model_spec("smollm2_135m")), **model},
        "workload": {
            "name": "agentic_coding",
            "params": {"prefix_tokens_min": 2000, "prefix_tokens_max": 6000, "calls_mean": 3, "output_max": 800},
        },
        "sim": {"num_sessions": 4, "session_rate": 1.0, "progress": False},
        "wandb": {"mode": "disabled"},
    }


def strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in WALL_CLOCK}


def test_defaults_give_the_summary_of_a_config_without_the_new_keys():
    # As configs were before: no storage keys in the model, no FP8 rate in the hardware entry.
    old = small_run()
    for key in ("kv_cache_dtype", "quantization"):
        del old["model"][key]
    old["hardware"] = {k: v for k, v in dataclasses.asdict(H100).items() if k != "peak_flops_fp8"}
    explicit = {**small_run(kv_cache_dtype="auto", quantization="none"), "hardware": dataclasses.asdict(H100)}
    a, b = Simulation(old).run(), Simulation(explicit).run()
    assert strip(a.summary) == strip(b.summary) and a.requests.equals(b.requests)
    assert a.summary["model"] == "smollm2_135m" and a.summary["hardware"] == "h100_sxm"


def test_an_fp8_run_is_labelled_holds_more_kv_and_its_fast_path_is_exact():
    base = Simulation(small_run()).run()
    fp8 = Simulation(small_run(kv_cache_dtype="fp8_e4m3", quantization="fp8")).run()
    slow = Simulation(
        {
            **small_run(kv_cache_dtype="fp8_e4m3", quantization="fp8"),
            "sim": {**small_run()["sim"], "fast_forward": False},
        }
    ).run()
    assert fp8.summary["model"] == "smollm2_135m (kv_cache_dtype=fp8_e4m3, quantization=fp8)"
    # head_dim 64: each KV head's 2*64 bf16 bytes become 64 + 4 (its scale), x1.88; fp8 weights free more
    assert fp8.summary["kv_blocks_per_replica"] > 128 / 68 * base.summary["kv_blocks_per_replica"]
    assert fp8.summary["tpot_s_p50"] < base.summary["tpot_s_p50"]
    assert strip(fp8.summary) == strip(slow.summary) and fp8.requests.equals(slow.requests)


def test_no_fp8_rate_is_noted_in_the_summary():
    cfg = {
        **small_run(quantization="fp8"),
        "hardware": {**dataclasses.asdict(H100), "name": "my_gpu", "peak_flops_fp8": None},
    }
    result = Simulation(cfg).run()
    assert any("gives no peak_flops_fp8" in note for note in result.notes)
    shipped = {**small_run(quantization="fp8"), "hardware": dataclasses.asdict(H100)}
    assert not any("peak_flops_fp8" in note for note in Simulation(shipped).run().notes)


# -- the Hydra app -----------------------------------------------------------------------------------

SMALL = [
    "model=smollm2_135m",
    "sim.num_sessions=2",
    "sim.progress=false",
    "+workload.params.calls_mean=2",
    "+workload.params.prefix_tokens_min=2000",
    "+workload.params.prefix_tokens_max=4000",
    "wandb.mode=disabled",
    "output.plots=false",
]


def simulate(tmp_path, *args):
    return run_simulate_app(tmp_path, *SMALL, *args, f"hydra.run.dir={tmp_path}/run")


def test_the_simulate_app_takes_the_options_from_the_command_line(tmp_path):
    proc = simulate(tmp_path, "model.kv_cache_dtype=fp8_e4m3", "model.quantization=fp8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "smollm2_135m (kv_cache_dtype=fp8_e4m3, quantization=fp8)"
    # SmolLM2-135M (30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64, MLP 1536, vocab 49152, tied)
    mats = ((576, (9 + 2 * 3) * 64), (9 * 64, 576), (576, 2 * 1536), (1536, 576))
    weights = 30 * sum(i * o + 4 * o for i, o in mats) + 2 * (49152 * 576 + 2 * 30 * 576 + 576)
    kv = 2 * 30 * 3 * (64 + 4)
    assert summary["kv_blocks_per_replica"] == int((80e9 * 0.9 - weights - GiB) // (kv * 16))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.kv_cache_dtype=fp16", "model.kv_cache_dtype must be one of auto, fp8_e4m3, got 'fp16'"),
        ("model.quantization=int8", "model.quantization must be one of none, fp8, got 'int8'"),
    ],
)
def test_the_simulate_app_rejects_a_bad_value(tmp_path, override, message):
    proc = simulate(tmp_path, override)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()

"""The twin's tensor-parallel replicas (issue #17): `model.tensor_parallel_size` in the simulator.

Expected values are worked out here from the published shapes and the hardware entries, not by the
code under test. Llama-3-8B (L=32, hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab
128256, untied, bf16) on N ranks:

    per rank and layer: qkv 4096 -> (32 + 2*8)/N * 128, o 4096/N -> 4096, gate_up 4096 -> 28672/N,
                        down 14336/N -> 4096: the linear weights / N (N divides the KV heads)
    weights per rank:   6,979,321,856 * 2 / N (linear) + 2*128256*4096*2 / N (embedding, LM head)
                        + 65*4096*2 (norms, whole on every rank)
    KV per token/rank:  131,072 / N while N <= 8; one KV head (16,384) beyond
    collectives a step (T tokens, S sampled rows; link bandwidth B, latency l each):
                        65 all-reduces of T*4096*2 bytes:  65 * (2 (N-1)/N * T*4096*2 / B + l)
                        1 all-gather of S*128256*2 bytes:  (N-1)/N * S*128256*2 / B + l

The TP 1 step costs below are what the code gave before tensor parallelism existed (commit ecee966).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from sim.cost import (
    PlanFeatures,
    RooflineCost,
    make_cost_model,
    ring_all_gather_seconds,
    ring_all_reduce_seconds,
    shipped_profile_path,
)
from sim.metrics import Collector, Slo
from sim.profile_cost import ProfileCost
from sim.simulation import Simulation
from sim.specs import (
    CONF_DIR,
    HardwareSpec,
    ModelSpec,
    hardware_label,
    kv_capacity_blocks,
    load_hardware_spec,
    load_model_spec,
)

from helpers import run_simulate_app

LLAMA = load_model_spec("llama3_8b")
H100 = load_hardware_spec("h100_sxm")
GiB = 1 << 30
WALL_CLOCK = {"wall_seconds", "steps_per_wall_s", "requests_per_wall_min"}

L, HID, HEADS, KVH, HD, MLP, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
PEAK, BW, LINK, LAT = 9.894e14, 3.35e12, 4.5e11, 5e-6  # conf/hardware/h100_sxm.yaml


def tp(model: ModelSpec, n: int) -> ModelSpec:
    return dataclasses.replace(model, tensor_parallel_size=n)


# -- TP 1 is what it was ---------------------------------------------------------------------------

PLANS = {
    "decode_b1_ctx512": PlanFeatures.of_requests([512], [1]),
    "decode_b32_ctx4096": PlanFeatures.of_requests([4096] * 32, [1] * 32),
    "prefill_2048": PlanFeatures.of_requests([0], [2048]),
    "mixed_chunk": PlanFeatures.of_requests([1000, 30000, 0], [1, 1, 4096], num_sampled=2),
    "swap_only": PlanFeatures(num_swap_out_blocks=3, num_swap_in_blocks=2, block_size=16),
}
# RooflineCost(...).step_seconds of PLANS and kv_capacity_blocks(..., 16), at ecee966 (before this change).
BEFORE = {
    ("llama3_8b", "h100_sxm", "none"): (
        {
            "decode_b1_ctx512": 0.004501874015522388,
            "decode_b32_ctx4096": 0.009655061855522389,
            "prefill_2048": 0.030319120940060403,
            "mixed_chunk": 0.06259183523050363,
            "swap_only": 0.00016384,
        },
        26162,
    ),
    ("llama3_8b", "h100_sxm", "fp8"): (
        {
            "decode_b1_ctx512": 0.002420137647761194,
            "decode_b32_ctx4096": 0.007573325487761194,
            "prefill_2048": 0.015872333835665817,
            "mixed_chunk": 0.03368415283118283,
            "swap_only": 0.00016384,
        },
        29487,
    ),
    ("qwen3_8b", "h200", "none"): (
        {
            "decode_b1_ctx512": 0.00317015056,
            "decode_b32_ctx4096": 0.007213443413333334,
            "prefill_2048": 0.03026484509506367,
            "mixed_chunk": 0.06281735389813624,
            "swap_only": 0.00018432,
        },
        46388,
    ),
    ("llama3_2_1b", "cpu", "none"): (
        {
            "decode_b1_ctx512": 0.12448883200000001,
            "decode_b32_ctx4096": 0.61023977472,
            "prefill_2048": 21.329988735999997,
            "mixed_chunk": 45.422268753919994,
            "swap_only": 0.000131072,
        },
        34436,
    ),
}


@pytest.mark.parametrize("key", sorted(BEFORE), ids=lambda k: "/".join(k))
def test_tp1_step_costs_and_kv_capacity_are_the_former_ones_bit_for_bit(key):
    model_name, hardware_name, quantization = key
    model = dataclasses.replace(load_model_spec(model_name), quantization=quantization)
    assert model.tensor_parallel_size == 1
    costs, blocks = BEFORE[key]
    hw = load_hardware_spec(hardware_name)
    # The shipped entry (with the new link fields) and one written before them price alike.
    old_hw = dataclasses.replace(hw, gpu_link_bandwidth=None, collective_latency_s=None)
    for entry in (hw, old_hw):
        cost = RooflineCost(model, entry)
        assert {name: cost.step_seconds(p) for name, p in PLANS.items()} == costs
        assert kv_capacity_blocks(model, entry, 16) == blocks
        assert cost.collective_seconds(4096, 32) == 0.0


def test_tp1_rank_shares_are_the_whole_model():
    for name in ("llama3_8b", "llama3_2_1b", "qwen3_8b", "smollm2_135m"):
        m = load_model_spec(name)
        assert m.rank_layer_matmuls() == m.layer_matmuls()
        assert m.rank_weight_bytes() == m.weight_bytes()
        assert m.rank_kv_bytes_per_token() == m.kv_bytes_per_token()
        assert m.label == m.name


# -- one rank's share --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8])
def test_a_rank_holds_its_share_of_weights_and_kv(n):
    m = tp(LLAMA, n)
    assert m.rank_layer_matmuls() == (
        ("qkv", HID, (HEADS + 2 * KVH) // n * HD),
        ("o", HEADS // n * HD, HID),
        ("gate_up", HID, 2 * MLP // n),
        ("down", MLP // n, HID),
    )
    assert m.rank_weight_bytes() == 6_979_321_856 * 2 // n + 2 * VOCAB * HID * 2 // n + 65 * HID * 2
    assert m.rank_kv_bytes_per_token() == 131_072 // n
    assert m.label == f"llama3_8b (tensor_parallel_size={n})"
    assert m.num_params() == LLAMA.num_params() and m.weight_bytes() == LLAMA.weight_bytes()  # the whole model


def test_with_fewer_kv_heads_than_ranks_each_rank_holds_one_kv_head():
    m = tp(LLAMA, 16)  # 8 KV heads over 16 ranks: two ranks hold each head
    assert m.kv_heads_per_rank == 1
    assert m.rank_kv_bytes_per_token() == LLAMA.kv_bytes_per_token() // KVH == 16_384  # not / 16
    assert m.rank_layer_matmuls()[0] == ("qkv", HID, (HEADS // 16 + 2 * 1) * HD)
    fp8 = dataclasses.replace(m, kv_cache_dtype="fp8_e4m3")
    assert fp8.rank_kv_bytes_per_token() == 2 * L * 1 * (HD + 4)


def test_fp8_scales_split_with_column_parallel_rows_and_stay_whole_under_row_parallelism():
    m = dataclasses.replace(tp(LLAMA, 4), quantization="fp8")
    qkv, o, gate_up, down = (HEADS + 2 * KVH) * HD // 4, HID, 2 * MLP // 4, HID  # output channels a rank
    linear = L * (
        HID * qkv + 4 * qkv + HEADS * HD // 4 * o + 4 * o + HID * gate_up + 4 * gate_up + MLP // 4 * down + 4 * down
    )
    assert m.rank_weight_bytes() == linear + (2 * VOCAB * HID // 4 + 65 * HID) * 2


# -- step costs --------------------------------------------------------------------------------------


def test_ring_collectives_follow_their_formulas():
    assert ring_all_reduce_seconds(1e9, 4, 1e11, 1e-5) == pytest.approx(2 * 3 / 4 * 1e9 / 1e11 + 1e-5, rel=1e-15)
    assert ring_all_gather_seconds(1e9, 4, 1e11, 1e-5) == pytest.approx(3 / 4 * 1e9 / 1e11 + 1e-5, rel=1e-15)
    assert ring_all_reduce_seconds(1e9, 1, 1e11, 1e-5) == ring_all_gather_seconds(1e9, 1, 1e11, 1e-5) == 0.0


def hand_collectives(n: int, tokens: int, sampled: int, link: float = LINK, latency: float = LAT) -> float:
    if n == 1:
        return 0.0
    reduce = 2 * (n - 1) / n * tokens * HID * 2 / link + latency
    gather = (n - 1) / n * sampled * VOCAB * 2 / link + latency
    return (2 * L + 1) * reduce + gather


def hand_decode_b1(n: int, context: int) -> float:
    """One request decoding after `context` tokens on a rank of N: every operation memory bound."""
    mats = ((HID, (HEADS + 2 * KVH) // n * HD), (HEADS // n * HD, HID), (HID, 2 * MLP // n), (MLP // n, HID))
    linear = L * sum(i * o * 2 + (i + o) * 2 for i, o in mats)
    head = HID * VOCAB // n * 2 + (HID + VOCAB // n) * 2
    kv = (context + 1) * 131_072 // n
    return (linear + head + kv) / BW + hand_collectives(n, 1, 1)


@pytest.mark.parametrize("n", [2, 4])
def test_tp_decode_b1_ctx512_is_below_tp1_and_above_tp1_over_n(n):
    step = PlanFeatures.of_requests([512], [1])
    one = RooflineCost(LLAMA, H100).step_seconds(step)
    many = RooflineCost(tp(LLAMA, n), H100).step_seconds(step)
    assert one / n < many < one
    assert many == pytest.approx(hand_decode_b1(n, 512), rel=1e-12)
    assert many - one / n > hand_collectives(n, 1, 1) * 0.99  # what TP adds is at least its collectives


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("tokens, sampled", [(1, 1), (32, 32), (2048, 1), (4096, 0), (8192, 3)])
def test_the_collective_term_is_the_ring_formula(n, tokens, sampled):
    model = tp(LLAMA, n)
    cost = RooflineCost(model, H100)
    assert cost.collective_seconds(tokens, sampled) == pytest.approx(hand_collectives(n, tokens, sampled), rel=1e-12)
    # In the step: two entries differing only in their link's bandwidth and latency differ by the formula's difference.
    slow = dataclasses.replace(H100, name="slow_link", gpu_link_bandwidth=LINK / 10, collective_latency_s=4 * LAT)
    step = PlanFeatures(
        num_tokens=tokens,
        num_reqs=max(sampled, 1),
        num_sampled=sampled,
        attn_pairs=1000 * tokens,
        kv_read_tokens=1000 + tokens,
    )
    expected = hand_collectives(n, tokens, sampled, LINK / 10, 4 * LAT) - hand_collectives(n, tokens, sampled)
    got = RooflineCost(model, slow).step_seconds(step) - cost.step_seconds(step)
    assert got == pytest.approx(expected, rel=1e-9)


def test_a_step_without_tokens_pays_no_collective():
    swap = PlanFeatures(num_swap_out_blocks=3, block_size=16)
    cost = RooflineCost(tp(LLAMA, 4), H100)
    assert cost.step_seconds(swap) == pytest.approx(3 * 16 * 131_072 / 4 / 6.4e10, rel=1e-12)  # each rank its KV
    assert cost.step_seconds(PlanFeatures()) == 0.0


def test_collective_latency_makes_the_roofline_no_longer_a_physical_limit():
    assert RooflineCost(LLAMA, H100).is_physical_limit
    assert not RooflineCost(tp(LLAMA, 2), H100).is_physical_limit
    no_latency = dataclasses.replace(H100, name="nvlink_no_latency", collective_latency_s=0.0)
    assert RooflineCost(tp(LLAMA, 2), no_latency).is_physical_limit
    text = RooflineCost(tp(LLAMA, 4), H100).describe()
    assert "per GPU of 4: weights 4.02 GB, KV 32768 bytes/token" in text
    assert "65 all-reduces" in text and "450 GB/s" in text


def test_tp_on_hardware_without_a_link_bandwidth_is_refused():
    no_link = dataclasses.replace(H100, name="gpu_no_link", gpu_link_bandwidth=None)
    RooflineCost(LLAMA, no_link)  # TP 1 needs none
    with pytest.raises(ValueError, match="gives no gpu_link_bandwidth"):
        RooflineCost(tp(LLAMA, 2), no_link)


# -- KV capacity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_kv_capacity_per_replica_grows_with_the_ranks(n):
    budget = 80e9 * 0.9
    one = kv_capacity_blocks(LLAMA, H100, 16)
    assert one == int((budget - 16_060_522_496 - GiB) // (131_072 * 16))
    model = tp(LLAMA, n)
    kv_heads = max(1, KVH // n)  # one KV head a rank beyond 8 ranks
    layer = HID * (HEADS // n + 2 * kv_heads) * HD + HEADS // n * HD * HID + HID * 2 * MLP // n + MLP // n * HID
    weights = (L * layer + 2 * VOCAB * HID // n + 65 * HID) * 2
    if n <= KVH:
        assert weights == 6_979_321_856 * 2 // n + 2 * VOCAB * HID * 2 // n + 65 * HID * 2
    kv = 2 * L * kv_heads * HD * 2
    blocks = kv_capacity_blocks(model, H100, 16)
    assert blocks == int((budget - weights - GiB) // (kv * 16))
    if n <= KVH:
        assert blocks > n * one  # N times the memory, and the weights' other shards freed
        assert blocks < n * one * (budget - GiB) / (budget - GiB - 16_060_522_496) + n


def test_the_simulation_sizes_a_tp_replicas_kv_tiers():
    cfg = {
        "model": {"tensor_parallel_size": 4},
        "hardware": dataclasses.asdict(H100),
        "engine": {"host_kv_gb": 10.0},
        "sim": {"num_sessions": 1},
    }
    sim = Simulation(cfg)
    assert sim.num_blocks == kv_capacity_blocks(tp(LLAMA, 4), H100, 16)
    assert sim.num_host_blocks == int(10e9 // (131_072 * 16))  # a replica's blocks: every rank's KV heads


# -- the cluster -------------------------------------------------------------------------------------


def test_the_collector_divides_by_the_gpus():
    c = Collector(3, 100, 1.0, Slo(5.0, 1.0), gpus_per_replica=4)
    assert c.num_gpus == 12
    with pytest.raises(ValueError, match="gpus_per_replica must be a positive integer"):
        Collector(1, 100, 1.0, Slo(5.0, 1.0), gpus_per_replica=0)


def small_run(n: int, replicas: int = 1, fast_forward: bool = True) -> dict:
    return {
        "model": {**dataclasses.asdict(load_model_spec("llama3_2_1b")), "tensor_parallel_size": n},
        "hardware": dataclasses.asdict(H100),
        "workload": {
            "name": "agentic_coding",
            "params": {"prefix_tokens_min": 2000, "prefix_tokens_max": 6000, "calls_mean": 3, "output_max": 800},
        },
        "cluster": {"num_replicas": replicas, "router": "least_loaded"},
        "sim": {"num_sessions": 6, "session_rate": 1.0, "progress": False, "fast_forward": fast_forward},
        "wandb": {"mode": "disabled"},
    }


def test_a_tp_replica_reports_per_gpu_throughput_over_its_gpus():
    one = Simulation(small_run(1, replicas=2)).run().summary
    two = Simulation(small_run(2, replicas=2)).run().summary
    assert (one["num_gpus"], two["num_gpus"]) == (2, 4)
    assert (one["tensor_parallel_size"], two["tensor_parallel_size"]) == (1, 2)
    assert two["model"] == "llama3_2_1b (tensor_parallel_size=2)"
    for s in (one, two):
        span = s["simulated_seconds"]
        assert s["per_gpu_output_tok_s"] == pytest.approx(s["output_tokens"] / span / s["num_gpus"], rel=1e-12)
        assert s["per_gpu_total_tok_s"] == pytest.approx(
            (s["output_tokens"] + s["prompt_tokens"]) / span / s["num_gpus"], rel=1e-12
        )
    # per replica, the TP run's throughput is twice what its per-GPU figure says
    assert two["per_gpu_output_tok_s"] * 2 == pytest.approx(two["output_tokens"] / two["simulated_seconds"] / 2)
    assert two["kv_blocks_per_replica"] > 2 * one["kv_blocks_per_replica"]
    assert two["tpot_s_p50"] < one["tpot_s_p50"]  # the sharded step is faster
    assert not two["physical_limit"]


def test_a_tp_clusters_fast_path_gives_the_reference_event_log():
    def run(fast: bool):
        result = Simulation(small_run(4, replicas=2, fast_forward=fast)).run()
        c = result.collector
        log = (c.step_start, c.step_seconds, c.step_tokens, c.step_reqs, c.kv_samples, c.requests, c.sessions)
        return log, {k: v for k, v in result.summary.items() if k not in WALL_CLOCK}

    fast, slow = run(True), run(False)
    assert fast[0] == slow[0]
    assert json.dumps(fast[1], sort_keys=True) == json.dumps(slow[1], sort_keys=True)


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, message",
    [
        (0, "model llama3_8b: tensor_parallel_size must be a positive integer, got 0"),
        (-2, "tensor_parallel_size must be a positive integer, got -2"),
        (3, "tensor_parallel_size 3 does not divide model llama3_8b's 32 query heads"),
        (64, "tensor_parallel_size 64 does not divide model llama3_8b's 32 query heads"),
    ],
)
def test_a_spec_with_a_bad_size_is_refused(n, message):
    with pytest.raises(ValueError, match=message):
        tp(LLAMA, n)


def test_a_size_that_does_not_divide_the_kv_heads_nor_is_a_multiple_of_them_is_refused():
    smol = load_model_spec("smollm2_135m")  # 9 heads, 3 KV heads, FFN 1536, vocab 49152
    assert tp(smol, 3).kv_heads_per_rank == 1
    with pytest.raises(ValueError, match="does not divide model smollm2_135m's 9 query heads"):
        tp(smol, 2)
    odd = dataclasses.replace(LLAMA, name="odd", num_heads=24, num_kv_heads=6, intermediate_size=12288)
    with pytest.raises(ValueError, match=r"4 does not divide model odd's 6 KV heads \(nor is it a multiple of them\)"):
        tp(odd, 4)


@pytest.mark.parametrize(
    "n, message",
    [
        (0, "model.tensor_parallel_size must be a positive integer, got 0"),
        (5, "model.tensor_parallel_size 5 does not divide model llama3_8b's 32 query heads"),
    ],
)
def test_a_config_with_a_bad_size_fails_before_the_run(n, message):
    with pytest.raises(ValueError, match=message):
        Simulation({"model": {"tensor_parallel_size": n}, "sim": {"num_sessions": 1}})


def test_a_one_gpu_profile_refuses_a_tp_model_and_a_tp_profile_takes_it(tmp_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1, but model llama3_8b .* tensor_parallel_size=2"):
        make_cost_model("profile", tp(LLAMA, 2), H100)
    saved = json.loads(shipped_profile_path("llama3_8b", "h100_sxm").read_text())
    saved["meta"]["tensor_parallel_size"] = "2"  # experiments.calibrate writes the engine's setting as a string
    path = tmp_path / "tp2.json"
    path.write_text(json.dumps(saved))
    make_cost_model("profile", tp(LLAMA, 2), H100, path)
    with pytest.raises(ValueError, match="tensor_parallel_size=2, but model llama3_8b"):
        ProfileCost.load(path).check_model(LLAMA)


# -- hardware entries --------------------------------------------------------------------------------


def test_the_nvlink_entries_and_an_old_entry_without_the_link_keys(tmp_path):
    for name in ("h100_sxm", "h200"):
        hw = load_hardware_spec(name)
        assert hw.gpu_link_bandwidth == 4.5e11 and 0 < hw.collective_latency_s < 2e-5
    cpu = load_hardware_spec("cpu")
    assert cpu.gpu_link_bandwidth > 0 and cpu.collective_latency_s > 0
    # An entry written before the link keys loads, and is no change of the shipped one.
    values = yaml.safe_load((CONF_DIR / "hardware" / "h100_sxm.yaml").read_text())
    old = {k: v for k, v in values.items() if k not in ("gpu_link_bandwidth", "collective_latency_s")}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    old_hw = load_hardware_spec(path)
    assert (old_hw.gpu_link_bandwidth, old_hw.collective_latency_s) == (None, None)
    assert hardware_label(old_hw) == "h100_sxm"
    slower = dataclasses.replace(H100, gpu_link_bandwidth=2e11)
    assert hardware_label(slower) == "h100_sxm (modified: gpu_link_bandwidth=2e+11)"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"gpu_link_bandwidth": 0.0}, "gpu_link_bandwidth must be finite and > 0"),
        ({"gpu_link_bandwidth": math.inf}, "gpu_link_bandwidth must be finite and > 0"),
        ({"collective_latency_s": -1e-6}, "collective_latency_s must be finite and >= 0"),
    ],
)
def test_bad_link_values_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        HardwareSpec(**{**dataclasses.asdict(H100), **change})


# -- the Hydra app -----------------------------------------------------------------------------------

SMALL = [
    "model=llama3_2_1b",
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


def test_the_simulate_app_takes_the_size_from_the_command_line(tmp_path):
    proc = simulate(tmp_path, "model.tensor_parallel_size=4", "cluster.num_replicas=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "llama3_2_1b (tensor_parallel_size=4)"
    assert (summary["tensor_parallel_size"], summary["num_replicas"], summary["num_gpus"]) == (4, 2, 8)
    assert summary["kv_blocks_per_replica"] == kv_capacity_blocks(tp(load_model_spec("llama3_2_1b"), 4), H100, 16)


def test_the_simulate_app_rejects_a_bad_size(tmp_path):
    proc = simulate(tmp_path, "model.tensor_parallel_size=3")
    message = "model.tensor_parallel_size 3 does not divide model llama3_2_1b's 32 query heads"
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()

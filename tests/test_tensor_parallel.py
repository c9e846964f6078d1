"""Tensor parallelism on the CPU: engine.tensor_parallel's pass at TP 2 and 4 over gloo, against TP 1.

The model level: each case spawns TP processes; every rank builds the same tiny random-weight model, shards it with the
pass, and runs a prefill of three ragged prompts, then decode steps, over its own paged KV cache (its
heads only). Rank 0's logits (gathered over the vocabulary) and greedy tokens must equal one process's
TP 1 run within float32 reduction-order tolerance. Llama (2 KV heads: split at TP 2, replicated over
pairs of ranks at TP 4) and Qwen3 (per-head q/k norms, tied embeddings).

The engine level: `LLM(..., tensor_parallel_size=N)` (rank 0 schedules and samples, the spawned ranks run
each step's forward on their shards) gives TP 1's greedy tokens and logprobs with prefix caching, chunked
prefill and preemption all exercised.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile

import pytest
import torch

from engine_helpers import tiny_config
from model_steps import prefill_then_decode, tiny_model

PROMPTS, STEPS = [7, 12, 3], 3


def _run(arch: str, overrides: dict, tp_rank: int = 0, tp_size: int = 1):
    from engine.kernels.registry import KernelSet
    from engine.tensor_parallel import TPGroup, shard_model

    torch.manual_seed(0)
    model = tiny_model(arch, **overrides)
    shard_model(model, TPGroup(tp_rank, tp_size))
    return prefill_then_decode(model, KernelSet("cpu", prefer=("torch",)), PROMPTS, steps=STEPS)


def _rank(rank: int, size: int, port: int, arch: str, overrides: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        logits, tokens = _run(arch, overrides, rank, size)
        if rank == 0:
            torch.save({"logits": logits, "tokens": tokens}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tp(arch: str, size: int, **overrides):
    """Rank 0's (logits per step, greedy tokens) of a TP `size` run in `size` spawned processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_rank, args=(size, _free_port(), arch, overrides, out), nprocs=size, join=True)
        got = torch.load(out)
    return got["logits"], got["tokens"]


CASES = {
    "llama_tp2_kv_heads_split": ("LlamaForCausalLM", 2, {}),
    "llama_tp4_kv_heads_replicated": ("LlamaForCausalLM", 4, {}),
    "qwen3_tp2_tied": ("Qwen3ForCausalLM", 2, {"tie_word_embeddings": True}),
    "qwen3_tp4_kv_heads_replicated": ("Qwen3ForCausalLM", 4, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_equals_one_rank(name: str) -> None:
    arch, size, overrides = CASES[name]
    want_logits, want_tokens = _run(arch, overrides)
    got_logits, got_tokens = run_tp(arch, size, **overrides)
    assert got_tokens == want_tokens
    assert len(got_logits) == len(want_logits) == STEPS + 1
    for got, want in zip(got_logits, want_logits):
        assert got.shape == want.shape  # the whole vocabulary, gathered
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sizes_that_do_not_divide_are_refused_with_the_reason() -> None:
    from engine.tensor_parallel import TPGroup, check_divisible, shard_model

    c = tiny_config("LlamaForCausalLM")  # 8 query heads, 2 KV heads, FFN 256, vocabulary 512
    with pytest.raises(ValueError, match="does not divide the 8 query heads"):
        check_divisible(c, 3)
    with pytest.raises(ValueError, match="the 3 KV heads"):
        check_divisible(tiny_config("LlamaForCausalLM", num_key_value_heads=3, num_attention_heads=6), 2)
    with pytest.raises(ValueError, match="FFN's 250 channels"):
        check_divisible(tiny_config("LlamaForCausalLM", intermediate_size=250), 4)
    with pytest.raises(ValueError, match="vocabulary of 510"):
        check_divisible(tiny_config("LlamaForCausalLM", vocab_size=510), 4)
    model = tiny_model("LlamaForCausalLM")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="query heads"):
        shard_model(model, TPGroup(0, 16))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before touching it
    with pytest.raises(ValueError, match="not a rank"):
        TPGroup(2, 2)


def test_the_pass_slices_every_rank_its_part_and_inserts_the_annotated_collectives() -> None:
    """No process group needed to shard: rank 1 of 4 keeps its heads, its FFN slice and a quarter of the
    vocabulary, a KV head shared with rank 0, and one all-reduce after every Partial output."""
    from engine.placement import collectives
    from engine.tensor_parallel import TPGroup, shard_model

    whole = tiny_model("LlamaForCausalLM")
    model = shard_model(tiny_model("LlamaForCausalLM"), TPGroup(1, 4))
    c, d = whole.config, whole.config.head_dim
    assert (model.config.num_heads, model.config.num_kv_heads, model.config.intermediate_size) == (2, 1, 64)
    assert model.config.vocab_size == c.vocab_size  # logits are gathered: the config keeps the whole vocabulary
    a, w = model.model.layers[0].self_attn, whole.model.layers[0].self_attn
    q, kv = c.num_heads * d, c.num_kv_heads * d
    want = torch.cat(
        [
            w.qkv_proj.weight[2 * d : 4 * d],  # query heads 2 and 3
            w.qkv_proj.weight[q : q + d],  # KV head 0, shared by ranks 0 and 1
            w.qkv_proj.weight[q + kv : q + kv + d],
        ]
    )
    assert torch.equal(a.qkv_proj.weight, want)
    assert torch.equal(a.o_proj.weight, w.o_proj.weight[:, 2 * d : 4 * d])
    m, wm = model.model.layers[0].mlp, whole.model.layers[0].mlp
    i = c.intermediate_size
    assert torch.equal(
        m.gate_up_proj.weight, torch.cat([wm.gate_up_proj.weight[64:128], wm.gate_up_proj.weight[i + 64 : i + 128]])
    )
    assert torch.equal(m.down_proj.weight, wm.down_proj.weight[:, 64:128])
    assert torch.equal(model.model.embed_tokens.weight, whole.model.embed_tokens.weight[128:256])
    assert torch.equal(model.lm_head.weight, whole.lm_head.weight[128:256])
    hooks = {n: len(mod._forward_hooks) for n, mod in model.named_modules() if mod._forward_hooks}
    reduces = [x.where for x in collectives(whole) if x.op == "all_reduce"]
    # every all-reduce the annotations imply sits on the module before it: the embedding (+ its zeroing
    # hook), each o and down projection; the LM head gathers
    assert hooks == {
        "model.embed_tokens": 2,
        **{f"model.layers.{n}.{p}": 1 for n in range(c.num_layers) for p in ("self_attn.o_proj", "mlp.down_proj")},
        "lm_head": 1,
    }
    assert len(reduces) == 2 * c.num_layers + 1


def _engine_run(path: str, tp: int, preemption: str = "recompute"):
    from engine import LLM, SamplingParams

    swap = {"preemption": "swap", "swap_space_gb": 0.01} if preemption == "swap" else {}
    llm = LLM(
        model=path,
        load_format="dummy",
        device="cpu",
        tensor_parallel_size=tp,
        max_num_seqs=4,
        chunk_size=16,  # 40-token prompts prefill in chunks
        max_num_batched_tokens=16,
        block_size=8,
        num_gpu_blocks=16,  # four requests of up to 67 tokens cannot all hold their blocks: preemption
        enable_prefix_caching=True,
        **swap,  # victims' blocks copied to the host and back on every rank
    )
    try:
        shared = list(range(5, 45))
        prompts = [shared, shared + [7, 8, 9], list(range(100, 140)), shared[:20] + [3] * 20]
        params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.stats()
        return (
            [o.outputs[0].token_ids for o in outs],
            [[next(iter(d.values())) for d in o.outputs[0].logprobs] for o in outs],
            stats,
        )
    finally:
        llm.close()


@pytest.mark.parametrize(
    "arch,tp,preemption",
    [
        ("LlamaForCausalLM", 2, "recompute"),
        ("LlamaForCausalLM", 4, "swap"),  # 4 ranks over 2 KV heads: each held by two ranks
        ("Qwen3ForCausalLM", 2, "swap"),
        ("Qwen3ForCausalLM", 4, "recompute"),
    ],
)
def test_the_engine_at_tensor_parallel_sizes_gives_tp1s_tokens(tmp_path, arch: str, tp: int, preemption: str) -> None:
    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, arch)
    want_tokens, want_logprobs, stats1 = _engine_run(path, 1, preemption)
    got_tokens, got_logprobs, stats = _engine_run(path, tp, preemption)
    assert got_tokens == want_tokens
    for got, want in zip(got_logprobs, want_logprobs):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    ran = stats.num_preemptions_swap if preemption == "swap" else stats.num_preemptions_recompute
    assert ran > 0  # the preemption ran (swap: its blocks out to every rank's host tier and back)
    assert stats.cached_tokens > 0  # so did prefix caching
    assert stats.num_blocks == stats1.num_blocks == 16  # the same KV geometry on every rank


def test_the_engine_refuses_a_size_that_does_not_divide_before_starting_ranks(tmp_path) -> None:
    from engine import LLM

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the 8 query heads"):
        LLM(model=path, load_format="dummy", device="cpu", tensor_parallel_size=3)
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
            LLM(model=path, load_format="dummy", device="cpu", tensor_parallel_size=bad)


def test_a_group_that_cannot_start_is_refused_before_loading(tmp_path, monkeypatch) -> None:
    """Fewer visible GPUs than ranks, or a second group in one process: refused before any weight loads or
    rank starts, saying why."""
    import torch.distributed as dist

    from engine.tensor_parallel import check_can_start

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs; 1 visible"):
        check_can_start(2, torch.device("cuda"))
    check_can_start(2, torch.device("cpu"))  # gloo ranks on the CPU: any number
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already runs a tensor-parallel engine"):
        check_can_start(2, torch.device("cpu"))

    from engine import LLM

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    loads = []
    monkeypatch.setattr("engine.core.load_model", lambda *a, **k: loads.append(1))
    with pytest.raises(RuntimeError, match="already runs a tensor-parallel engine"):
        LLM(model=path, load_format="dummy", device="cpu", tensor_parallel_size=2)
    assert not loads


def test_a_rank_that_exits_fails_the_start_or_the_step_at_once_naming_it(tmp_path) -> None:
    """A rank whose process ends before it joins (options it cannot read; a model it cannot load) fails rank
    0's start at once with its exit code, not after the rendezvous timeout; one killed between steps fails
    the next step the same way, and closing the engine then neither raises nor waits on it."""
    import time

    import torch.distributed as dist

    from engine import LLM, SamplingParams
    from engine.tensor_parallel import RankExited, TPDriver

    from engine_helpers import write_tiny_config

    @dataclasses.dataclass
    class Unreadable:  # EngineConfig.from_dict refuses its field: the rank exits before joining
        no_such_option: int = 1

    from engine.config import EngineConfig

    missing = EngineConfig.from_dict(dict(model=str(tmp_path / "missing"), device="cpu"))  # its load fails
    for config in (Unreadable(), missing):  # before the rank reaches the store; after, while loading its shard
        start = time.monotonic()
        with pytest.raises(RankExited, match="rank 1 exited with code 1 before joining"):
            TPDriver(2).start(config, torch.device("cpu"))
        assert time.monotonic() - start < 60 and not dist.is_initialized()

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    llm = LLM(model=path, load_format="dummy", device="cpu", tensor_parallel_size=2, num_gpu_blocks=16)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    try:
        assert len(llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        rank1 = llm.engine.tp.procs[0]
        rank1.kill()
        rank1.wait()
        with pytest.raises(RankExited, match="rank 1 exited with code -9; the engine cannot step"):
            llm.generate([[5, 6, 8]], params, use_tqdm=False)
    finally:
        start = time.monotonic()
        llm.close()
    assert time.monotonic() - start < 10 and not dist.is_initialized()


def test_kv_capacity_per_replica_grows_with_the_ranks(tmp_path) -> None:
    """Sized from memory, each rank holds its KV heads only: TP 2 halves a block's bytes, doubling the blocks."""
    from engine import LLM
    from engine.memory import block_bytes

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")  # 2 KV heads: one a rank at TP 2
    blocks = {}
    for tp in (1, 2):
        llm = LLM(model=path, load_format="dummy", device="cpu", tensor_parallel_size=tp, kv_cache_memory_gb=0.002)
        try:
            blocks[tp] = llm.engine.num_blocks
            per_block = block_bytes(llm.engine.model, 16, torch.float32)
            assert llm.engine.runner.kv.k.shape[3] == 2 // tp  # this rank's KV heads
            assert blocks[tp] == int(0.002 * 2**30 // per_block)
        finally:
            llm.close()
    assert blocks[2] == 2 * blocks[1]


# ------------------------------------------------------------------------------ per-rank loading


def _same_params(got, want, skip=()) -> None:
    pairs = list(zip(got.named_parameters(), want.named_parameters()))
    assert [n for (n, _), _ in pairs] == [n for _, (n, _) in pairs]
    for (name, a), (_, b) in pairs:
        assert a.shape == b.shape, name
        if not any(s in name for s in skip):
            assert torch.equal(a.float(), b.float()), name


@pytest.mark.parametrize(
    "arch,quantization,overrides",
    [
        ("LlamaForCausalLM", "none", {}),
        ("Qwen3ForCausalLM", "none", {"tie_word_embeddings": True}),
        ("Qwen2ForCausalLM", "none", {}),  # q|k|v biases, cut with their rows
        ("LlamaForCausalLM", "fp8", {}),
    ],
)
def test_each_rank_loads_its_part_of_random_and_safetensors_weights(tmp_path, arch, quantization, overrides) -> None:
    """load_model(..., tp) shards the empty model and reads only the rank's part of each tensor: every rank at
    TP 2 and 4 holds exactly what sharding the whole loaded model gives (random weights and a safetensors
    checkpoint; FP8 checkpoints cut their per-channel scales with the rows)."""
    import json

    from safetensors.torch import save_file

    from engine.config import EngineConfig
    from engine.loader import load_model
    from engine.tensor_parallel import TPGroup, shard_model

    from engine_helpers import write_tiny_config

    cpu = torch.device("cpu")
    path = write_tiny_config(tmp_path, arch, **overrides)
    dummy = EngineConfig.from_dict(
        {"model": path, "load_format": "dummy", "device": "cpu", "quantization": quantization}
    )
    whole = load_model(dummy, cpu, torch.float32).model
    tensors = whole.hf_state_dict(quantized=quantization == "fp8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(whole.config.to_hf(), f)
    hf = EngineConfig.from_dict(
        {"model": str(tmp_path), "load_format": "hf", "device": "cpu", "quantization": quantization}
    )
    # a bf16 model quantized as it loads scales a rank's row-parallel columns on their own (docs/engine.md)
    own_scales = ("o_proj", "down_proj") if quantization == "fp8" else ()
    for size in (2, 4):
        for rank in range(size):
            tp = TPGroup(rank, size)
            got = load_model(dummy, cpu, torch.float32, tp).model
            _same_params(got, shard_model(load_model(dummy, cpu, torch.float32).model, tp), own_scales)
            assert got.config.num_heads == whole.config.num_heads // size
            got = load_model(hf, cpu, torch.float32, tp).model  # an FP8 checkpoint: its own scales, cut
            _same_params(got, shard_model(load_model(hf, cpu, torch.float32).model, tp))
    if quantization == "fp8":  # per-tensor scales, as [1] and [1, 1]: read whole on every rank
        for i, name in enumerate(n for n in tensors if n.endswith(".weight_scale")):
            tensors[name] = tensors[name].amax().reshape((1,) if i % 2 else (1, 1))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
        tp = TPGroup(1, 2)
        got = load_model(hf, cpu, torch.float32, tp).model
        _same_params(got, shard_model(load_model(hf, cpu, torch.float32).model, tp))


def test_a_gguf_rank_reads_its_rows_and_columns_and_dequantizes_no_more(monkeypatch) -> None:
    """SmolLM2 (9 heads, 3 KV heads) at TP 3: rank 1 loaded from the GGUF file equals the whole model's
    shard, and no dequantized array it makes is larger than its own largest part (rows are cut before
    dequantizing; columns in whole quantization blocks)."""
    import copy

    from gguf import quants

    from engine.loader import build_model, embedded_default_path, gguf_file
    from engine.tensor_parallel import TPGroup, shard_model

    path = embedded_default_path()
    reader = gguf_file._reader(path)
    config = gguf_file.read_config(reader, path)
    cpu = torch.device("cpu")
    whole = build_model(config, cpu, torch.float32)
    whole.load_weights(gguf_file.iter_tensors(reader, config, path))
    largest = []
    dequantize = quants.dequantize

    def counting(data, kind):
        out = dequantize(data, kind)
        largest.append(out.size)
        return out

    monkeypatch.setattr(quants, "dequantize", counting)
    tp = TPGroup(1, 3)
    got = build_model(config, cpu, torch.float32, tp=tp)
    got.load_weights(gguf_file.iter_tensors(reader, config, path, got))
    _same_params(got, shard_model(copy.deepcopy(whole), tp))
    assert max(largest) == max(p.numel() for p in got.parameters())  # the rank's vocabulary rows
    assert max(largest) * 3 == whole.model.embed_tokens.weight.numel()


def test_gguf_columns_not_on_block_boundaries_are_cut_after_dequantizing() -> None:
    from gguf import quants

    from engine.loader import embedded_default_path, gguf_file

    reader = gguf_file._reader(embedded_default_path())
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")  # Q4_1, blocks of 32
    whole = quants.dequantize(t.data, t.tensor_type)
    for start, count in ((0, 64), (16, 100), (500, 76)):
        assert (gguf_file._columns(t, start, count) == whole[:, start : start + count]).all()


_PEAK = """
import json, sys, torch
from engine.config import EngineConfig
from engine.loader import load_model
from engine.tensor_parallel import TPGroup

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

path, warm, rank, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tp = TPGroup(rank, size) if size > 1 else None
# the same load of a tiny model first: what the load imports is not what it holds
def config(model):
    return EngineConfig.from_dict({"model": model, "load_format": "dummy", "device": "cpu"})

load_model(config(warm), torch.device("cpu"), torch.float32, tp)
cfg = config(path)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size
except OSError:
    pass
base = max(status("VmRSS"), status("VmHWM"))
model = load_model(cfg, torch.device("cpu"), torch.float32, tp).model
print(json.dumps({"peak": status("VmHWM") - base, "bytes": sum(p.numel() * 4 for p in model.parameters())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak resident size from /proc")
def test_loading_a_rank_never_holds_the_whole_model_measured_peak_memory(tmp_path) -> None:
    """The peak resident memory of a process loading rank 1 of 4 (random weights of a 276 MB float32 model)
    stays within its quarter plus one draw chunk; loading the whole model peaks at the whole."""
    import json
    import subprocess
    import sys

    from engine.loader.dummy import CHUNK_ELEMENTS

    from engine_helpers import write_tiny_config

    (tmp_path / "big").mkdir()
    path = write_tiny_config(
        tmp_path / "big", "LlamaForCausalLM", vocab_size=131072, hidden_size=256, intermediate_size=1024, head_dim=32
    )
    warm = write_tiny_config(tmp_path, "LlamaForCausalLM")

    def peak(rank: int, size: int) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _PEAK, path, warm, str(rank), str(size)],
            check=True,
            capture_output=True,
            text=True,
            # a fixed mmap threshold: freed buffers go back to the system, so the peak is what was held
            env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"},
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole, rank = peak(0, 1), peak(1, 4)
    chunk = CHUNK_ELEMENTS * 4
    assert whole["bytes"] > 270e6 and rank["bytes"] * 4 == pytest.approx(whole["bytes"], rel=0.05)
    assert whole["peak"] >= 0.9 * whole["bytes"]  # the measure sees a whole model
    assert rank["peak"] <= rank["bytes"] + chunk + 16 * 2**20, (rank, whole)


def test_the_collectives_are_timed_on_every_rank_between_steps_and_bench_engine_sizes_one_rank(tmp_path) -> None:
    """bench_engine --tp's pieces on CPU: TPDriver.time_collectives runs the step's all-reduce and all-gather
    on every rank (the ranks then still run steps in step), and Bytes.of counts rank 0's shard."""
    from engine import LLM, SamplingParams
    from experiments.bench_engine import Bytes, collective_seconds

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    got = {}
    for tp in (1, 2):
        llm = LLM(model=path, load_format="dummy", device="cpu", tensor_parallel_size=tp, num_gpu_blocks=32)
        try:
            core = llm.engine
            first = llm.generate([list(range(3, 20))], params, use_tqdm=False)[0].outputs[0].token_ids
            seconds = collective_seconds(core, 2)
            if tp == 1:
                assert seconds == 0.0
            else:
                all_reduce, all_gather = core.tp.time_collectives(2, 128, 256, torch.float32, core.device, iters=3)
                assert 0 < all_reduce < 1 and 0 < all_gather < 1 and seconds > 0
            again = llm.generate([list(range(3, 20))], params, use_tqdm=False)[0].outputs[0].token_ids
            assert again == first
            got[tp] = (first, Bytes.of(core))
        finally:
            llm.close()
    assert got[2][0] == got[1][0]
    one, two = got[1][1], got[2][1]
    assert two.kv_per_token * 2 == one.kv_per_token  # one of the 2 KV heads a rank
    assert two.head_flops * 2 == one.head_flops  # half the vocabulary
    assert two.linear_flops * 2 == one.linear_flops
    assert two.weights_read < 0.6 * one.weights_read


def test_bench_engine_twin_prices_a_tp_step_and_its_collectives(monkeypatch, capsys) -> None:
    """bench_engine --tp's twin column (a GPU script, its host-side pieces on CPU): the roofline of the same shape
    at TP 4 prices one GPU's share plus the collectives, and print_twin gives each row's error."""
    from types import SimpleNamespace

    from experiments import bench_engine

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    args = SimpleNamespace(tp=4)
    one = bench_engine.twin_cost("llama-3.1-8b", SimpleNamespace(tp=1), 3e12, 7.8e14, "bf16")
    four = bench_engine.twin_cost("llama-3.1-70b", args, 3e12, 7.8e14, "bf16")
    eight_tp4 = bench_engine.twin_cost("llama-3.1-8b", args, 3e12, 7.8e14, "fp8kv")
    assert bench_engine.twin_cost("smollm2-135m-not-a-conf", args, 3e12, 7.8e14, "bf16") is None
    b1 = bench_engine.twin_seconds(one, [512], [1])
    assert b1 == pytest.approx(15.01e9 / 3e12, rel=0.02)  # the 8B's weights but the embedding table at 3 TB/s
    seventy = bench_engine.twin_seconds(four, [512], [1])
    collectives = four.collective_seconds(1, 1)
    assert collectives > 0 and seventy == pytest.approx(139.0e9 / 4 / 3e12 + collectives, rel=0.02)
    assert bench_engine.twin_seconds(eight_tp4, [50000] * 4, [1] * 4) < bench_engine.twin_seconds(
        one, [50000] * 4, [1] * 4
    )
    rows = [
        {
            "model": "llama-3.1-70b-tp4",
            "what": "decode b1 ctx512 (s/step)",
            "engine_s": 1.2 * seventy,
            "twin_s": seventy,
        }
    ]
    bench_engine.print_twin(rows)
    assert "+20.0%" in capsys.readouterr().out


def test_serve_checks_the_size_and_gives_each_replica_its_ranks_gpus(tmp_path, monkeypatch) -> None:
    """`python -m engine.serve engine.tensor_parallel_size=N`: a size the model's shape does not divide fails
    before any core starts (`error: ...`, not a core's traceback); with data_parallel_size too, each core's
    CUDA_VISIBLE_DEVICES holds its own N GPUs, and too few GPUs are refused."""
    from engine.config import EngineConfig
    from engine.serve.__main__ import make_router, serve

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")  # 8 query heads
    engine = {"load_format": "dummy", "device": "cpu", "tensor_parallel_size": 3}
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the 8 query heads"):
        serve({"model": path, "engine": engine})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    options = {"model": path, "load_format": "dummy", "device": "cuda", "tensor_parallel_size": 2}
    cfg = EngineConfig.from_dict(options)
    router = make_router(options, cfg, 2, "round_robin")
    try:
        assert [c.cuda_devices for c in router.clients] == ["0,1", "2,3"]
    finally:
        for c in router.clients:
            c.ctx.destroy(linger=0)
    with pytest.raises(ValueError, match="data_parallel_size=3 x tensor_parallel_size=2 needs 6 GPUs; 4 visible"):
        make_router(options, cfg, 3, "round_robin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")  # one core of two ranks: the GPUs it inherits
    (one,) = make_router(options, cfg, 1, "round_robin").clients
    one.ctx.destroy(linger=0)
    assert one.cuda_devices is None


def test_the_ranks_load_the_quantization_rank_0_holds(tmp_path, monkeypatch) -> None:
    """An FP8 model handed in loaded, the option left out: the other ranks are told fp8, not the option's none
    (each loads its own shard from the checkpoint, and must hold what rank 0 holds)."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.loader import load_model
    from engine.tensor_parallel import TPDriver

    from engine_helpers import write_tiny_config

    path = write_tiny_config(tmp_path, "LlamaForCausalLM")
    config = lambda **kw: EngineConfig.from_dict(dict(model=path, load_format="dummy", device="cpu", **kw))  # noqa: E731
    told = []

    def start(self, cfg, device):
        told.append(cfg.quantization)
        raise RuntimeError("no ranks in this test")

    monkeypatch.setattr(TPDriver, "start", start)
    fp8 = load_model(config(quantization="fp8"), torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="no ranks in this test"):
        EngineCore(config(tensor_parallel_size=2), loaded=fp8)
    assert told == ["fp8"]

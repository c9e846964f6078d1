"""Where the host part of a batch-1 decode step goes (wall clock, no extra syncs), for the engine's graph path.

It measures the strict loop (overlap_decode off): the host work that overlap hides (engine/overlap.py).

    python -m experiments.host_path [--model llama-3.1-8b] [--steps 40]

Prints medians of: the planner (scheduler.step), reorder, the graph path's input staging up to the replay
launch, the sampler's launches, the wait for the sampled token, commit + bookkeeping, and the GPU's own
time between the first input copy and the sampled token (CUDA events), so that step - GPU = host exposed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main(argv=None) -> None:
    import engine.runner as runner_mod
    from engine import SamplingParams
    from engine.config import EngineConfig
    from engine.core import EngineCore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    core = EngineCore(
        EngineConfig.from_dict(
            dict(
                model=args.model,
                load_format="dummy",
                dtype="bfloat16",
                num_gpu_blocks=4096,
                max_model_len=4096,
                max_num_seqs=8,
                cuda_graph_batch_sizes=(1,),
                enable_prefix_caching=False,
                overlap_decode=False,
            )
        )
    )
    r = core.runner
    marks: dict[str, list[float]] = {
        k: [] for k in ("reorder", "stage+launch", "sampler", "step", "gpu", "core.step total")
    }
    orig_forward, orig_sampler = r.forward, r.sampler
    ev = {}

    def forward(batch, plan, ids_dev=None):
        t = time.perf_counter()
        ev["s"] = torch.cuda.Event(enable_timing=True)
        ev["s"].record()
        out = orig_forward(batch, plan, ids_dev)
        marks["stage+launch"].append(time.perf_counter() - t)
        return out

    class Sampler:
        generator = orig_sampler.generator

        def __call__(self, logits, seqs, pending=0):
            t = time.perf_counter()
            res = orig_sampler(logits, seqs, pending)
            ev["e"] = torch.cuda.Event(enable_timing=True)
            ev["e"].record()
            marks["sampler"].append(time.perf_counter() - t)
            return res

    detail: dict[str, list[float]] = {}

    def graph_run(self, batch, plan, ids_dev=None):  # DecodeGraphs.run with a clock between its statements
        t = [time.perf_counter()]
        n = len(batch.input_ids)
        b = next(x for x in self.sizes if x >= n)
        width = max(1, -(-int(batch.seq_lens.max()) // r.block_size))
        bucket = next(w for w in self.widths if w >= width)
        total = 4 * b + b * bucket
        self.turn ^= 1
        host_stage, copied = self.host_stages[self.turn], self.copied[self.turn]
        copied.synchronize()
        t.append(time.perf_counter())
        stage = host_stage.numpy()
        host = stage[: 4 * b].reshape(4, b)
        host[0, :n], host[1, :n], host[2, :n], host[3, :n] = (
            batch.input_ids,
            batch.positions,
            batch.slot_mapping,
            batch.seq_lens,
        )
        host[:, n:b] = ((0,), (0,), (-1,), (1,))
        table = stage[4 * b : total].reshape(b, bucket)
        table[:n] = np.asarray(plan.block_table)[batch.block_rows, :bucket]
        table[n:] = 0
        t.append(time.perf_counter())
        self.dev_stage[:total].copy_(host_stage[:total], non_blocking=True)
        copied.record()
        t.append(time.perf_counter())
        self.last_key = (b, bucket)
        self.graphs[self.last_key].replay()
        t.append(time.perf_counter())
        out = self.logits[:n]
        for name, a, z in (
            ("sync prev copy", 0, 1),
            ("numpy staging", 1, 2),
            ("H2D launch", 2, 3),
            ("graph replay()", 3, 4),
        ):
            detail.setdefault(name, []).append(t[z] - t[a])
        return out

    type(r.graphs).run = graph_run
    r.forward = forward
    r.sampler = Sampler()
    orig_reorder = runner_mod.reorder_decodes_first

    def reorder(plan):
        t = time.perf_counter()
        out = orig_reorder(plan)
        marks["reorder"].append(time.perf_counter() - t)
        return out

    runner_mod.reorder_decodes_first = reorder

    rng = np.random.default_rng(0)
    core.add_request(
        1,
        rng.integers(0, core.model_config.vocab_size, 512),
        SamplingParams(temperature=0.0, max_tokens=args.steps + 10, ignore_eos=True),
    )
    for i in range(args.steps + 8):
        t = time.perf_counter()
        out = core.step()
        total = time.perf_counter() - t
        if i < 4:
            for v in marks.values():
                v.clear()
            continue
        marks["core.step total"].append(total)
        marks["step"].append(out.seconds)
        ev["e"].synchronize()
        marks["gpu"].append(ev["s"].elapsed_time(ev["e"]) / 1e3)
    print(f"{args.model} batch 1 decode, medians over {len(marks['step'])} steps (ms)")
    for k, v in marks.items():
        if v:
            print(f"  {k:18s} {1e3 * statistics.median(v):8.3f}")
    for k, v in detail.items():
        print(f"    graphs.run {k:16s} {1e3 * statistics.median(v[4:]):8.3f}")
    print(f"  step - gpu         {1e3 * (statistics.median(marks['step']) - statistics.median(marks['gpu'])):8.3f}")
    print(
        f"  core.step - step   "
        f"{1e3 * (statistics.median(marks['core.step total']) - statistics.median(marks['step'])):8.3f}"
    )


if __name__ == "__main__":
    main()

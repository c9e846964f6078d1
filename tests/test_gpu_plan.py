"""Plans drive a paged KV cache held in torch tensors, on the CPU and on a CUDA device.

The CUDA case runs on a GPU machine with `make test-gpu`; it is skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

import controlplane as cp
from controlplane.testing import next_token, reference_generate

torch = pytest.importorskip("torch")


class TorchToyModel:
    """ToyModel's contract in torch: KV tensors on `device`, every index op a torch op."""

    def __init__(self, config, device="cuda"):
        bs = config.block_size
        self.bs, self.vocab = bs, config.vocab_size
        self.dev = torch.full((config.num_blocks, bs, 2), -1, dtype=torch.int64, device=device)
        self.host = torch.full((max(config.num_host_blocks, 1), bs, 2), -1, dtype=torch.int64)
        if device != "cpu":
            self.host = self.host.pin_memory()
        self.device = device

    def run(self, plan):
        ops = torch.as_tensor(np.array(plan.kv_ops), dtype=torch.long)
        for op, src, dst in ops.tolist():
            if op == 0:
                self.host[dst].copy_(self.dev[src], non_blocking=False)
            else:
                self.dev[dst].copy_(self.host[src].to(self.device, non_blocking=True))
        # Copies of the plan's read-only views into device tensors (one H2D copy each).
        slots = torch.as_tensor(np.array(plan.slot_mapping)).to(self.device, non_blocking=True)
        ids = torch.as_tensor(np.array(plan.input_ids, dtype=np.int64)).to(self.device, non_blocking=True)
        pos = torch.as_tensor(np.array(plan.positions, dtype=np.int64)).to(self.device, non_blocking=True)
        flat = self.dev.view(-1, 2)
        flat.index_copy_(0, slots, torch.stack([ids, pos], dim=1))
        table = torch.as_tensor(np.array(plan.block_table[plan.slots])).to(self.device)
        out = []
        for i in np.flatnonzero(plan.sample):
            length = int(plan.cached_lens[i] + plan.query_lens[i])
            p = torch.arange(length, device=self.device)
            blocks = table[i, p // self.bs].long()
            assert bool((blocks >= 0).all())
            kv = self.dev[blocks, p % self.bs]
            assert torch.equal(kv[:, 1], p), "KV read back at the wrong positions"
            out.append(next_token(kv[:, 0].cpu().numpy(), self.vocab))
        return np.asarray(out, dtype=np.int64), 0.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("preemption, host", [("recompute", 0), ("swap", 32)])
def test_plans_drive_a_torch_paged_cache(device, preemption, host):
    sched = cp.Scheduler(
        num_blocks=24,
        block_size=8,
        num_host_blocks=host,
        max_num_seqs=6,
        max_num_batched_tokens=64,
        chunk_size=32,
        max_model_len=160,
        vocab_size=1000,
        preemption=preemption,
    )
    model = TorchToyModel(sched.config, device)
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 1000, 40).tolist()
    prompts = {rid: shared + rng.integers(0, 1000, int(rng.integers(1, 30))).tolist() for rid in range(10)}
    for rid, prompt in prompts.items():
        sched.add_request(rid, prompt, max_new_tokens=40)
    records = cp.run_loop(sched, model, cp.ManualClock(), idle_advance=1.0)
    sched.check_invariants()
    finished = {f.request_id: f for r in records for f in r.finished}
    for rid, prompt in prompts.items():
        assert list(finished[rid].output_token_ids) == reference_generate(prompt, 40, 1000)
    stats = sched.stats()
    assert stats.num_preemptions_recompute + stats.num_preemptions_swap > 0
    assert stats.cached_tokens > 0

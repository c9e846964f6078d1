"""Sampling parameters (vLLM's names and defaults) and the batched sampler.

One sampler step, for S rows that sample this step::

    logits [S, V] fp32 --penalties--> /temperature --top-k/top-p/min-p mask--> softmax
        --> greedy rows: argmax;   seeded rows: argmax(p / Exp(1) noise from the row's own generator)
            unseeded rows: the same with noise from the engine's generator

Dividing by exponential noise and taking the argmax draws exactly from p (the
Gumbel-max trick in another form) without a CPU sync per row; a row's own
generator makes a seeded request's tokens independent of what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """What to generate for one prompt; validated on construction (ValueError names the field)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model length
    min_tokens: int = 0
    stop: Sequence[str] | str | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-N logprobs per generated token (0: the sampled token's only)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_list: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1, 0 (off) or a positive integer")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "an integer in [0, 20] or None")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise bad("stop", "a non-empty string or a list of them")
        self.stop_list = stops
        ids = tuple(self.stop_token_ids or ())
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise bad("stop_token_ids", "a list of token ids >= 0")

    def for_choice(self, k: int) -> "SamplingParams":
        """The parameters of the k-th of `n` samples of one prompt: a seeded request's copies get seed + k."""
        import dataclasses

        return self if self.seed is None or k == 0 else dataclasses.replace(self, seed=self.seed + k)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float("-inf") < float(x) < float("inf")


@dataclass
class SequenceState:
    """The runner's view of one request: its parameters, tokens so far and its generator."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    stop_ids: tuple[int, ...] = ()  # EOS + stop_token_ids: masked while fewer than min_tokens were output
    max_new_tokens: int | None = None  # the scheduler's limit for it (None: unknown)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None = None  # [S] fp32, of the sampled tokens (raw logits)
    top_ids: torch.Tensor | None = None  # [S, N]
    top_logprobs: torch.Tensor | None = None  # [S, N]


class Sampler:
    """Samples one token per row from float32 logits, with each row's SamplingParams."""

    def __init__(self, ops, device: torch.device, seed: int = 0) -> None:
        self.ops = ops
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: Sequence[SequenceState], pending: int = 0) -> SampleResult:
        """`pending`: tokens each row has produced beyond its `output_ids` (1 for an overlapped next step)."""
        raw = logits
        early = [i for i, s in enumerate(seqs) if s.stop_ids and len(s.output_ids) + pending < s.params.min_tokens]
        if early:
            logits = logits.clone()
            for i in early:
                logits[i, self._row_tensor(list(seqs[i].stop_ids), torch.int64)] = float("-inf")
        if any(s.params.needs_penalties for s in seqs):
            logits = self._penalise(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs, greedy)
        return self._with_logprobs(raw, tokens, seqs)

    def _row_tensor(self, values, dtype) -> torch.Tensor:
        # built on the host and sent without a sync: a blocking copy would wait for the whole GPU queue
        # (with overlapped decode, the step still running)
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _penalise(self, logits: torch.Tensor, seqs: Sequence[SequenceState]) -> torch.Tensor:
        s, v = logits.shape
        seen = torch.zeros(s, v, dtype=torch.bool, device=self.device)
        counts = torch.zeros(s, v, dtype=torch.int32, device=self.device)
        for i, seq in enumerate(seqs):
            if not seq.params.needs_penalties:
                continue
            if seq.prompt_ids:
                seen[i, torch.tensor(seq.prompt_ids, device=self.device)] = True
            if seq.output_ids:
                out = torch.tensor(seq.output_ids, device=self.device)
                seen[i, out] = True
                counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
        p = [seq.params for seq in seqs]
        return self.ops.apply_penalties(
            logits,
            seen,
            counts,
            self._row_tensor([x.repetition_penalty for x in p], torch.float32),
            self._row_tensor([x.presence_penalty for x in p], torch.float32),
            self._row_tensor([x.frequency_penalty for x in p], torch.float32),
        )

    def _sample(self, logits: torch.Tensor, seqs: Sequence[SequenceState], greedy: list[bool]) -> torch.Tensor:
        p = [seq.params for seq in seqs]
        temps = self._row_tensor([1.0 if g else x.temperature for g, x in zip(greedy, p)], torch.float32)
        scaled = logits / temps[:, None]
        if any(x.top_k > 0 or x.top_p < 1 or x.min_p > 0 for x in p):
            scaled = self.ops.top_k_top_p_min_p(
                scaled,
                self._row_tensor([x.top_k for x in p], torch.int64),
                self._row_tensor([x.top_p for x in p], torch.float32),
                self._row_tensor([x.min_p for x in p], torch.float32),
            )
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_t = self._row_tensor(greedy, torch.bool)
        return torch.where(greedy_t, logits.argmax(dim=-1), sampled)

    def _with_logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, seqs: Sequence[SequenceState]) -> SampleResult:
        wanted = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
        if not wanted:
            return SampleResult(tokens)
        logp = torch.log_softmax(raw, dim=-1)
        chosen = logp.gather(1, tokens[:, None])[:, 0]
        n = max(wanted)
        if n == 0:
            return SampleResult(tokens, chosen)
        top = logp.topk(n, dim=-1)
        return SampleResult(tokens, chosen, top.indices, top.values)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))

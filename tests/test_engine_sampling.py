"""The sampler and the sampling helpers: semantics of each parameter, on a tiny random model (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import tiny_config


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from engine import LLM

    path = tmp_path_factory.mktemp("model") / "config.json"
    # std of the random weights is small, so logits are flat: sampling really samples
    path.write_text(json.dumps(tiny_config("LlamaForCausalLM", vocab_size=256).to_hf()))
    return LLM(str(path), load_format="dummy", device="cpu", num_gpu_blocks=256, seed=5)


PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21]]


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def run(llm, prompts=PROMPTS, **params):
    from engine import SamplingParams

    return llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(**{"max_tokens": 12, "ignore_eos": True, **params}),
        use_tqdm=False,
    )


def test_seeded_requests_do_not_depend_on_their_batch(llm):
    alone = ids(run(llm, [PROMPTS[1]], temperature=1.0, seed=42))[0]
    batched = ids(run(llm, PROMPTS, temperature=1.0, seed=42))[1]
    again = ids(run(llm, [PROMPTS[1]], temperature=1.0, seed=42))[0]
    assert alone == batched == again
    other = ids(run(llm, [PROMPTS[1]], temperature=1.0, seed=43))[0]
    assert other != alone  # 12 tokens of a 256-token vocabulary from a flat distribution


def test_unseeded_sampling_varies_and_greedy_does_not(llm):
    assert len({tuple(t) for t in ids(run(llm, [PROMPTS[0]] * 4, temperature=1.0))}) > 1
    greedy = ids(run(llm, [PROMPTS[0]] * 3, temperature=0.0))
    assert greedy[0] == greedy[1] == greedy[2]


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_truncation_to_one_token_is_greedy(llm, params):
    greedy = ids(run(llm, temperature=0.0))
    assert ids(run(llm, temperature=1.5, seed=1, **params)) == greedy


def test_top_k_top_p_min_p_masks():
    from engine.kernels.torch_ops import top_k_top_p_min_p

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    out = top_k_top_p_min_p(
        logits.clone(),
        torch.tensor([2, 0, 0, 0]),
        torch.tensor([1.0, 0.7, 1.0, 0.85]),
        torch.tensor([0.0, 0.0, 0.5, 0.0]),
    )
    kept = torch.isfinite(out).tolist()
    assert kept[0] == [True, True, False, False]  # top_k=2
    assert kept[1] == [True, True, False, False]  # top_p=0.7: 0.5 + 0.3 reaches it
    assert kept[2] == [True, True, False, False]  # min_p=0.5: >= 0.25
    assert kept[3] == [True, True, True, False]  # top_p=0.85: needs the third token
    assert torch.equal(out[0, :2], logits[0, :2])  # kept logits are untouched


def test_penalties_follow_their_definitions():
    from engine.kernels.torch_ops import apply_penalties

    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, True]])
    counts = torch.tensor([[0, 0, 0, 3]])
    out = apply_penalties(logits, seen, counts, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # repetition 2: 2 -> 1, -2 -> -4, 0.5 -> 0.25; then token 3 (output 3 times): -0.25*3 - 0.5
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 1.0, 0.25 - 0.75 - 0.5]]))


def test_repetition_penalty_discourages_repeats(llm):
    from engine import SamplingParams

    def distinct(**p):
        out = llm.generate(
            {"prompt_token_ids": PROMPTS[0]},
            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, **p),
            use_tqdm=False,
        )
        return len(set(out[0].outputs[0].token_ids))

    assert distinct(frequency_penalty=2.0) > distinct()
    assert distinct(repetition_penalty=3.0) > distinct()


def test_logprobs_are_those_of_the_model(llm):
    out = run(llm, [PROMPTS[1]], temperature=0.0, logprobs=3)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    core = llm.engine
    # recompute the first step's distribution with the model directly
    from engine.attention import AttentionMetadata, ForwardContext, KVCache
    from engine.models.decoder import rope_cos_sin

    c = core.model_config
    prompt = PROMPTS[1]
    kv = KVCache(*(torch.zeros(c.num_layers, 1, 16, c.num_kv_heads, c.head_dim) for _ in range(2)))
    t = len(prompt)
    meta = AttentionMetadata(
        torch.arange(t),
        0,
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0, 1, dtype=torch.int32),
        torch.tensor([0, t], dtype=torch.int32),
        torch.tensor([t], dtype=torch.int32),
        torch.zeros(1, 1, dtype=torch.int32),
        t,
    )
    with torch.inference_mode():
        hidden = core.model(
            torch.tensor(prompt), torch.arange(t), ForwardContext(core.ops, kv, meta, rope_cos_sin(c, 64))
        )
        logp = torch.log_softmax(core.model.compute_logits(hidden[-1:]), -1)[0]
    first = out.logprobs[0]
    top = logp.topk(3)
    assert list(first)[0] == out.token_ids[0] == int(top.indices[0])
    assert set(first) == set(top.indices.tolist())
    for token, value in first.items():
        assert value == pytest.approx(float(logp[token]), abs=1e-5)
    assert out.cumulative_logprob == pytest.approx(sum(next(iter(e.values())) for e in out.logprobs))


def test_n_samples_and_min_tokens(llm):
    from engine import SamplingParams

    outs = llm.generate(
        {"prompt_token_ids": PROMPTS[0]}, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8), use_tqdm=False
    )
    assert [o.index for o in outs[0].outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs[0].outputs}) > 1
    greedy = ids(run(llm, [PROMPTS[0]], temperature=0.0, max_tokens=10))[0]

    def with_stop(**p):
        return llm.generate(
            {"prompt_token_ids": PROMPTS[0]},
            SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[greedy[0]], **p),
            use_tqdm=False,
        )[0].outputs[0]

    plain = with_stop()
    assert plain.token_ids == [greedy[0]] and plain.finish_reason == "stop" and plain.stop_reason == greedy[0]
    held = with_stop(min_tokens=3)
    assert len(held.token_ids) >= 3 and greedy[0] not in held.token_ids[:3]


def test_engine_profile_feeds_the_simulator_profile_cost_model(llm, tmp_path):
    from sim.cost import ProfileCost

    run(llm, temperature=0.0)
    path = tmp_path / "profile.csv"
    assert llm.engine.save_profile(str(path)) == len(llm.engine.profile) > 5
    fit = ProfileCost.fit(path)
    assert (
        fit.step_seconds(
            type(
                "P",
                (),
                {
                    f: 1
                    for f in (
                        "num_tokens",
                        "num_reqs",
                        "num_sampled",
                        "attn_pairs",
                        "kv_read_tokens",
                        "num_swap_out_blocks",
                        "num_swap_in_blocks",
                    )
                },
            )()
        )
        > 0
    )

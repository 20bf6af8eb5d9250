"""torch.compile(model, fullgraph=True) prefill with attn_implementation="flexpbs" at several lengths.

    python examples/compiled_prefill.py                       # tiny random Llama on CPU
    python examples/compiled_prefill.py --lengths 300 700 1500 3000

Prints, per prompt length, the time of the compiled forward, how many times the model itself was
compiled (dynamo frames) and how many graphs were compiled in all (the model's plus FlexAttention's
static per-bucket graphs behind the custom op flexpbs::attention), and the error against eager PBS.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import flexpbs.integrations.transformers as fx
from flexpbs.sparse_attention import bucket_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[600, 700, 650, 1000, 1100, 2000])
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()

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
    )
    model = transformers.LlamaForCausalLM(config).eval()
    fx.register(block_size=64, segment_size=128, threshold=args.threshold)
    model.set_attn_implementation("flexpbs")
    frames = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=frames)

    print("length bucket  time    model compiles  graphs in all  max |compiled - eager|")
    with torch.no_grad():
        for n in args.lengths:
            ids = torch.randint(0, config.vocab_size, (1, n))
            start = time.perf_counter()
            # use_cache (the default) matters: without a cache transformers cannot rule out packed
            # sequences while compiling and passes a mask, which sends attention to SDPA.
            out = compiled(ids).logits
            seconds = time.perf_counter() - start
            graphs = counters["stats"]["unique_graphs"]
            err = (out - model(ids).logits).abs().max().item()
            print(
                f"{n:6d} {bucket_length(n, 64):6d} {seconds:6.1f} s {frames.frame_count:8d} "
                f"{graphs:14d}  {err:.1e}"
            )


if __name__ == "__main__":
    main()

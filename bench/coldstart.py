"""GPU: first-call latency, what a user waits for the first time flexpbs sees a shape.

    python -m bench coldstart                                   # flexpbs's default backend, every section
    python -m bench coldstart --backend flash --sections warmup lengths chunks
    python -m bench coldstart --no-warmup                       # the first call pays the compile

Sections (``--sections``), in one process, in this order:

- ``warmup``: ``flexpbs.warmup(...)`` for the harness shape and options, timed (skipped with
  ``--no-warmup``, or when the flexpbs on the path has no ``warmup``).
- ``lengths``: for each length, the first call at that length, then the median of ``--repeat`` warm
  calls at it (wall clock around a device sync: host time included).
- ``chunks``: one ``--chunk-prompt``-token prompt in chunks of each ``--chunks`` size (each chunk's
  queries against every key up to its end), twice: the first pass meets every chunk shape for the
  first time, the second is warm. Beside it, the whole prompt in one call and SDPA cuDNN over the same
  chunks (bottom-right causal mask; cuDNN takes no bottom-right mask, so this is SDPA's efficient
  kernel with an explicit mask, the one transformers runs for chunks).
- ``hf``: ``generate`` (one new token) of a randomly initialised Llama (``--hf-layers`` layers, the
  harness's heads, ``attn_implementation="flexpbs"``) over ``--hf-prompts`` prompts of lengths spread
  over ``--hf-range``, in total: a first pass and a second pass over the same prompts, and SDPA.

flexpbs runs its sparse path at every length (``min_seq_len=0``). B=1, Hq=32, Hkv=8, D=128, bf16, the
synthetic workload (:mod:`bench.workloads`, seed 0): one draw of ``--draw`` tokens whose prefixes give
shorter lengths; longer lengths repeat it. Everything runs under ``torch.no_grad()``, as ``generate``
does (compiled graphs are specialised on the grad mode), after a first CUDA call that stands for loading
a model. Prints a table per section and writes ``--json``. Timings are wall-clock seconds or milliseconds
around device syncs (:func:`bench.timing.wall_s`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import flexpbs

from .timing import first_and_warm, wall_s
from .workloads import prefix, synthetic_qkv

DEV = torch.device("cuda")
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def compile_count() -> int:
    """Compilations so far in this process: dynamo graphs, variants of flexpbs's Triton importance
    kernels and flash-attn-4 kernels (when imported). A first call that raises it compiled."""
    from torch._dynamo.utils import counters

    count = counters["stats"]["unique_graphs"]
    try:
        from flexpbs.kernels import importance as kernels

        count += kernels.compiled_variants()
    except (ImportError, AttributeError):
        pass
    fa4 = sys.modules.get("flash_attn.cute.interface")
    if fa4 is not None:
        cache = getattr(fa4._flash_attn_fwd, "compile_cache", None)
        count += len(getattr(cache, "cache", cache or ()))  # its JITCache keeps a dict in .cache
    return count


def first_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, options: dict, repeat: int) -> dict:
    """The first call at length ``n`` (a prefix of the draw ``q``/``k``/``v``) and the median warm call."""
    qn, kn, vn = prefix(q, n), prefix(k, n), prefix(v, n)
    before = compile_count()
    first, warm = first_and_warm(lambda: flexpbs.attention(qn, kn, vn, **options), repeat)
    compiles = compile_count() - before
    print(
        f"N={n}: first {first:.1f} ms, warm {warm:.2f} ms, extra {first - warm:.1f} ms, compiles {compiles}",
        flush=True,
    )
    return dict(n=n, first_ms=first, warm_ms=warm, extra_ms=first - warm, compiles=compiles)


def chunk_pass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, fn: Callable[..., torch.Tensor]
) -> float:
    """Seconds to run ``fn(q_chunk, k_upto, v_upto)`` over every chunk of the prompt, in order."""

    def every_chunk() -> None:
        for stop in range(chunk, q.shape[2] + chunk, chunk):
            end = min(stop, q.shape[2])
            fn(q[:, :, end - chunk : end], k[:, :, :end], v[:, :, :end])

    return wall_s(every_chunk)


def sdpa_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with a bottom-right causal mask: queries ``[B, Hq, Nq, D]`` at the last Nq of N key positions."""
    n_q, n = q.shape[2], k.shape[2]
    mask = torch.ones(n_q, n, dtype=torch.bool, device=q.device).tril(n - n_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def section_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: list[int], prompt: int, options: dict
) -> list[dict]:
    """One prompt in chunks of each size, twice, beside the whole prompt in one call and SDPA over the
    same chunks."""
    qp, kp, vp = prefix(q, prompt), prefix(k, prompt), prefix(v, prompt)
    whole = first_and_warm(lambda: flexpbs.attention(qp, kp, vp, **options), 3)[1]

    def pbs(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        return flexpbs.attention(qc, kc, vc, **options)

    rows = []
    for chunk in chunks:
        before = compile_count()
        first = chunk_pass(qp, kp, vp, chunk, pbs)
        compiles = compile_count() - before
        second = chunk_pass(qp, kp, vp, chunk, pbs)
        chunk_pass(qp, kp, vp, chunk, sdpa_lower_right)
        sdpa = chunk_pass(qp, kp, vp, chunk, sdpa_lower_right)
        row = dict(
            prompt=prompt,
            chunk=chunk,
            first_pass_ms=first * 1e3,
            second_pass_ms=second * 1e3,
            whole_prompt_ms=whole,
            sdpa_chunks_ms=sdpa * 1e3,
            first_over_second=first / second,
            compiles=compiles,
        )
        rows.append(row)
        print({key: round(val, 2) if isinstance(val, float) else val for key, val in row.items()}, flush=True)
    return rows


def section_hf(prompts: int, low: int, high: int, layers: int, options: dict) -> dict:
    """``generate`` over random prompts with flexpbs (first and second pass) and with SDPA."""
    import transformers

    import flexpbs.integrations.transformers as fx

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=2 * high,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).to(DEV, torch.bfloat16).eval()
    pbs = fx.register(**options)
    gen = torch.Generator().manual_seed(1)
    lengths = [int(x) for x in torch.randint(low, high + 1, (prompts,), generator=gen)]
    ids = [torch.randint(3, 1024, (1, n), generator=gen).to(DEV) for n in lengths]

    def all_prompts() -> None:
        for x in ids:
            model.generate(x, max_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(x))

    def seconds_with(attn_implementation: str) -> float:
        model.set_attn_implementation(attn_implementation)
        return wall_s(all_prompts)

    before = compile_count()
    first = seconds_with("flexpbs")
    compiles = compile_count() - before
    second = seconds_with("flexpbs")
    seconds_with("sdpa")
    sdpa = seconds_with("sdpa")
    pbs_calls = pbs.calls["pbs"]
    # untimed: a random model's attention is nearly uniform, so PBS keeps most tiles (stats cost time)
    densities: list[torch.Tensor] = []
    pbs.on_stats = lambda layer, stats: densities.append(stats.density.mean())
    seconds_with("flexpbs")
    pbs.on_stats = None
    result = dict(
        prompts=lengths,
        layers=layers,
        first_pass_s=first,
        second_pass_s=second,
        sdpa_s=sdpa,
        compiles=compiles,
        pbs_calls=pbs_calls,
        mean_density=torch.stack(densities).mean().item() if densities else None,
        backends=dict(getattr(pbs, "backends", {})),
    )
    print(result, flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["warmup", "lengths", "chunks", "hf"],
        choices=["warmup", "lengths", "chunks", "hf"],
    )
    parser.add_argument("--backend", default=None, help="flexpbs backend option (default: flexpbs's default)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--max-seq-len", type=int, default=None, help="flexpbs.warmup's max_seq_len")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[4096, 6000, 16384, 24576, 28800, 32768, 40960, 65537, 100000, 131072, 262144, 524288],
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--draw", type=int, default=131072, help="tokens of the synthetic draw")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--chunk-prompt", type=int, default=131072)
    parser.add_argument("--hf-prompts", type=int, default=10)
    parser.add_argument("--hf-range", type=int, nargs=2, default=[16384, 65536])
    parser.add_argument("--hf-layers", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every section's rows here")


@torch.no_grad()  # as transformers' generate runs; compiled graphs are specialised on the grad mode
def run(args: argparse.Namespace) -> None:
    options = dict(threshold=args.threshold, min_seq_len=0)  # the sparse path at every length
    if args.backend:
        options["backend"] = args.backend
    result: dict = dict(options=options, torch=torch.__version__, device=torch.cuda.get_device_name())
    process_start = time.perf_counter()

    # The process's first CUDA work (context, cuBLAS, SDPA), which a server has done by loading its model
    result["cuda_init_s"] = wall_s(
        lambda: F.scaled_dot_product_attention(*(torch.randn(1, 1, 128, 64, device=DEV),) * 3)
    )
    if "warmup" in args.sections and not args.no_warmup and hasattr(flexpbs, "warmup"):
        result["warmup_s"] = flexpbs.warmup(
            HEADS,
            KV_HEADS,
            HEAD_DIM,
            dtype=torch.bfloat16,
            device=DEV,
            max_seq_len=args.max_seq_len,
            **options,
        )
        print(f"CUDA init {result['cuda_init_s']:.2f} s, then warmup: {result['warmup_s']:.2f} s", flush=True)
    q, k, v = synthetic_qkv(1, HEADS, KV_HEADS, args.draw, HEAD_DIM, device=DEV)
    if "lengths" in args.sections:
        result["lengths"] = [first_call(q, k, v, n, options, args.repeat) for n in args.lengths]
    if "chunks" in args.sections:
        result["chunks"] = section_chunks(q, k, v, args.chunks, args.chunk_prompt, options)
    del q, k, v
    if "hf" in args.sections:
        torch.cuda.empty_cache()
        result["hf"] = section_hf(args.hf_prompts, *args.hf_range, args.hf_layers, options)
    result["process_s"] = time.perf_counter() - process_start

    print("\n| N | first call ms | warm ms | extra ms | compiles |\n|---|---|---|---|---|")
    for row in result.get("lengths", []):
        print(
            f"| {row['n']} | {row['first_ms']:.1f} | {row['warm_ms']:.2f} | "
            f"{row['extra_ms']:.1f} | {row['compiles']} |"
        )
    if "chunks" in result:
        print(
            "\n| chunk | first pass ms | second pass ms | first / second | whole prompt ms | "
            "SDPA chunks ms | compiles |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in result["chunks"]:
            print(
                f"| {row['chunk']} | {row['first_pass_ms']:.1f} | {row['second_pass_ms']:.1f} | "
                f"{row['first_over_second']:.2f} | {row['whole_prompt_ms']:.1f} | "
                f"{row['sdpa_chunks_ms']:.1f} | "
                f"{row['compiles']} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)

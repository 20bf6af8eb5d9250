"""GPU: a packed batch in one call against its sequences one by one, padding, and dense baselines.

    python -m bench varlen                              # the two batches below, every method
    python -m bench varlen --batches mixed --json bench_out/varlen.json

Two batches (Hq=32, Hkv=8, D=128, bf16, the synthetic workload at threshold 0.9; each sequence a prefix of
its own draw): ``mixed``, 8 sequences from 4K to 96K (256K tokens), and ``short``, 16 sequences of
16K-24K. Side by side on the same tokens, medians of CUDA-event timings (:func:`bench.timing.cuda_ms`,
host time included where a call is host-bound):

- ``varlen``: ``flexpbs.varlen_attention`` reading the offsets (the sequences in frames of similar
  length, :func:`flexpbs.varlen.frame_groups`);
- ``varlen_one_frame``: the same with the maxima given (no host synchronisation, CUDA-graph capturable:
  one frame as long as the longest sequence);
- ``singles``: ``flexpbs.attention`` on each sequence, one after the other (their sum);
- ``varlen_host``, ``singles_host``: their host time alone (:func:`bench.timing.host_ms`);
- ``padded``: ``flexpbs.attention`` on the batch right-padded to its longest sequence, ``valid_keys``;
- ``cudnn``: SDPA cuDNN per sequence (summed); ``flex_document``: one compiled FlexAttention call over
  the packed tokens with a document-causal mask (dense).

flexpbs runs its sparse path at every length (``min_seq_len=0``) on ``--backend`` (Triton by default).
Prints a table and writes ``--json``. ``--profile`` instead lists, per batch, the CUDA kernels of one
varlen call and of the single calls, longest first (torch.profiler: kernel time only, no host time).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexpbs

from .profile_call import kernel_events, per_call
from .timing import cuda_ms, host_ms
from .workloads import synthetic_qkv

DEV = torch.device("cuda")
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCHES = {
    "mixed": [4096, 8192, 12288, 16384, 24576, 32768, 65536, 98304],
    "short": [
        16384,
        24576,
        18432,
        20480,
        16384,
        22528,
        24576,
        17408,
        19456,
        21504,
        23552,
        16384,
        24576,
        20480,
        18432,
        22528,
    ],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    parser.add_argument("--backend", default="triton", choices=["triton", "flash", "auto"])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="kernel tables instead of timings")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per table (--profile)")


def packed(lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """(q [total, Hq, D], k, v [total, Hkv, D], cu_seqlens int32, the per-sequence [1, H, N, D] views)."""
    sequences = [
        synthetic_qkv(1, HEADS, KV_HEADS, n, HEAD_DIM, device=DEV, seed=i) for i, n in enumerate(lengths)
    ]
    q, k, v = (torch.cat([s[i][0].transpose(0, 1) for s in sequences]) for i in range(3))
    cu = torch.tensor([0, *lengths], device=DEV).cumsum(0).to(torch.int32)
    return q, k, v, cu, sequences


def padded(sequences, longest: int) -> tuple[torch.Tensor, ...]:
    """The batch right-padded to ``longest``: q/k/v ``[B, H, longest, D]`` and ``valid_keys [B, longest]``."""
    pad = [[F.pad(x, (0, 0, 0, longest - x.shape[2])) for x in s] for s in sequences]
    q, k, v = (torch.cat([p[i] for p in pad]) for i in range(3))
    valid = (
        torch.arange(longest, device=DEV)[None]
        < torch.tensor([s[0].shape[2] for s in sequences], device=DEV)[:, None]
    )
    return q, k, v, valid


def padded_ms(sequences, longest: int, options: dict) -> float:
    """Milliseconds of ``flexpbs.attention`` on the batch right-padded to ``longest`` (``valid_keys``)."""
    q, k, v, valid = padded(sequences, longest)
    return cuda_ms(lambda: flexpbs.attention(q, k, v, valid_keys=valid, **options))


def document_mask(cu: torch.Tensor, total: int):
    """FlexAttention BlockMask of the packed batch: each query sees its own sequence's earlier keys."""
    sequence = torch.searchsorted(cu[1:], torch.arange(total, device=DEV), right=True)

    def document_causal(b, h, q_idx, kv_idx):
        return (sequence[q_idx] == sequence[kv_idx]) & (kv_idx <= q_idx)

    # _compile: the eager builder materialises every (query, key) pair (out of memory from ~96K tokens)
    return create_block_mask(document_causal, None, None, total, total, device=DEV, _compile=True)


def measure(lengths: list[int], options: dict) -> dict:
    q, k, v, cu, sequences = packed(lengths)
    longest, total = max(lengths), sum(lengths)
    row: dict = {"lengths": lengths, "tokens": total}
    maxima = dict(max_seqlen_q=longest, max_seqlen_k=longest)
    row["varlen"] = cuda_ms(lambda: flexpbs.varlen_attention(q, k, v, cu, cu, **options))
    row["varlen_one_frame"] = cuda_ms(lambda: flexpbs.varlen_attention(q, k, v, cu, cu, **maxima, **options))

    def singles():
        for s in sequences:
            flexpbs.attention(*s, **options)

    row["singles"] = cuda_ms(singles)
    # host time of each (issued while the GPU is busy): what a host-bound batch of single calls pays
    row["varlen_host"] = host_ms(lambda: flexpbs.varlen_attention(q, k, v, cu, cu, **options))
    row["singles_host"] = host_ms(singles)
    row["padded"] = padded_ms(sequences, longest, options)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for s in sequences:
                F.scaled_dot_product_attention(*s, is_causal=True, enable_gqa=True)

    row["cudnn"] = cuda_ms(cudnn)
    mask = document_mask(cu, total)
    document_flex = torch.compile(flex_attention, dynamic=False)
    qd, kd, vd = (x.transpose(0, 1)[None] for x in (q, k, v))
    row["flex_document"] = cuda_ms(lambda: document_flex(qd, kd, vd, block_mask=mask, enable_gqa=True))
    _, stats = flexpbs.varlen_attention(q, k, v, cu, cu, return_stats=True, **options)
    row["density"] = sum(s.density.mean().item() * n for s, n in zip(stats, lengths, strict=True)) / total
    return row


def profile_batch(lengths: list[int], options: dict, top: int) -> None:
    """Prints the CUDA kernels of one varlen call and of the sequences' single calls, longest first."""
    q, k, v, cu, sequences = packed(lengths)
    longest = max(lengths)
    calls = {
        "varlen": lambda: flexpbs.varlen_attention(q, k, v, cu, cu, **options),
        "varlen_one_frame": lambda: flexpbs.varlen_attention(
            q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest, **options
        ),
        "singles": lambda: [flexpbs.attention(*s, **options) for s in sequences],
    }
    for label, fn in calls.items():
        events = kernel_events(fn, calls=2)
        total, launches = per_call(events, 2)
        print(f"\n{label}: {total:.2f} ms of CUDA kernels per call, {launches} launches\n")
        print("| kernel | ms per call | launches per call |\n|---|---|---|")
        for e in events[:top]:
            print(f"| {e.key[:90]} | {e.device_time_total / 2 / 1e3:.3f} | {e.count // 2} |")


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    options = dict(threshold=args.threshold, min_seq_len=0, backend=args.backend)
    flexpbs.warmup(HEADS, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEV, **options)
    if args.profile:
        for name in args.batches:
            print(f"\n== {name}: {BATCHES[name]}")
            profile_batch(BATCHES[name], options, args.top)
        return
    rows = {}
    for name in args.batches:
        rows[name] = measure(BATCHES[name], options)
        print(
            name,
            {key: round(val, 3) if isinstance(val, float) else val for key, val in rows[name].items()},
            flush=True,
        )
        if args.json:  # after every batch: a run stopped early keeps what it measured
            result = {"options": options, "rows": rows, "device": torch.cuda.get_device_name()}
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    print(
        "\n| batch | tokens | density | varlen ms | singles ms | singles / varlen | one frame ms | padded ms "
        "| SDPA cuDNN ms | flex document ms | host ms: varlen / singles |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['tokens']} | {r['density']:.3f} | {r['varlen']:.2f} | {r['singles']:.2f} | "
            f"{r['singles'] / r['varlen']:.2f}x | {r['varlen_one_frame']:.2f} | {r['padded']:.2f} "
            f"| {r['cudnn']:.2f} "
            f"| {r['flex_document']:.2f} | {r['varlen_host']:.1f} / {r['singles_host']:.1f} |"
        )

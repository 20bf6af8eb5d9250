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
- ``singles``: ``flexpbs.attention`` on each sequence, one after the other (their sum), each given as a
  contiguous ``[1, H, N, D]`` tensor; ``singles_packed``: the same on strided views of the packed
  tensors, as a caller holding a packed batch would call them;
- ``host``: the host time of ``varlen_one_frame`` and of ``singles`` (:func:`bench.timing.host_ms`);
- ``padded``: ``flexpbs.attention`` on the batch right-padded to its longest sequence, ``valid_keys``;
- ``cudnn``: SDPA cuDNN per sequence (summed); ``flex_document``: one compiled FlexAttention call over
  the packed tokens with a document-causal mask (dense).

flexpbs runs its sparse path at every length (``min_seq_len=0``) on ``--backend`` (Triton by default).
Prints a table and writes ``--json``. ``--profile`` instead lists, per batch, the CUDA kernels of one
varlen call and of the single calls, longest first (torch.profiler: kernel time only, no host time).
"""

from __future__ import annotations

import argparse
import itertools
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
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
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


METHODS = (
    "varlen",
    "varlen_one_frame",
    "singles",
    "singles_packed",
    "host",
    "padded",
    "cudnn",
    "flex_document",
)


def measure(lengths: list[int], options: dict, methods: list[str]) -> dict:
    q, k, v, cu, sequences = packed(lengths)
    longest, total = max(lengths), sum(lengths)
    row: dict = {"lengths": lengths, "tokens": total}
    maxima = dict(max_seqlen_q=longest, max_seqlen_k=longest)

    def singles():
        for s in sequences:
            flexpbs.attention(*s, **options)

    starts = [0, *itertools.accumulate(lengths)]
    views = [tuple(x[a:b].transpose(0, 1)[None] for x in (q, k, v)) for a, b in itertools.pairwise(starts)]

    def singles_packed():  # what a caller holding the packed tensors passes: strided [1, H, N, D] views
        for s in views:
            flexpbs.attention(*s, **options)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for s in sequences:
                F.scaled_dot_product_attention(*s, is_causal=True, enable_gqa=True)

    calls = {
        "varlen": lambda: flexpbs.varlen_attention(q, k, v, cu, cu, **options),
        "varlen_one_frame": lambda: flexpbs.varlen_attention(q, k, v, cu, cu, **maxima, **options),
        "singles": singles,
        "singles_packed": singles_packed,
        "cudnn": cudnn,
    }
    for name in methods:
        if name in calls:
            row[name] = cuda_ms(calls[name])
    if "host" in methods:
        # host time (issued while the GPU is busy) of the packed call that reads no offsets and of the
        # single calls; about 500 ms means the call waited for the GPU (a synchronisation)
        row["varlen_one_frame_host"] = host_ms(calls["varlen_one_frame"])
        row["singles_host"] = host_ms(singles)
    if "padded" in methods:
        row["padded"] = padded_ms(sequences, longest, options)
    if "flex_document" in methods:
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
        rows[name] = measure(BATCHES[name], options, args.methods)
        print(
            name,
            {key: round(val, 3) if isinstance(val, float) else val for key, val in rows[name].items()},
            flush=True,
        )
        if args.json:  # after every batch: a run stopped early keeps what it measured
            result = {"options": options, "rows": rows, "device": torch.cuda.get_device_name()}
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    columns = [
        m
        for m in (
            "varlen",
            "varlen_one_frame",
            "singles",
            "singles_packed",
            "padded",
            "cudnn",
            "flex_document",
        )
        if m in args.methods
    ]
    print(
        "\n| batch | tokens | density | " + " | ".join(f"{c} ms" for c in columns) + " | singles / varlen |"
    )
    print("|---" * (len(columns) + 4) + "|")
    for name, r in rows.items():
        cells = " | ".join(f"{r[c]:.2f}" for c in columns)
        ratio = f"{r['singles'] / r['varlen']:.2f}x" if "singles" in r and "varlen" in r else "-"
        print(f"| {name} | {r['tokens']} | {r['density']:.3f} | {cells} | {ratio} |")

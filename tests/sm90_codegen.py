"""Compiles flexpbs's Triton kernels for an H100 (sm_90) without a GPU and prints, per kernel, what the
PTX loads from global memory: run as a script by tests/test_kernel_codegen.py, outside the interpreter.

Each kernel is called through its real launch code on CPU tensors of a 128K-token prefill (B=1, Hq=32,
Hkv=8, D=128, bf16, the pipeline's [B, N, H, D] storage; the row copy moves its keys into a frame of four
sequences); a stand-in records the launch's arguments
instead of running it, and the kernel is then compiled with them under Triton's specialisation rules
(integers not in ``do_not_specialize``: the value 1 is a constant, multiples of 16 are marked
divisible; pointers are 16-byte aligned), as the GPU would compile it. The importance kernels are also
launched on a frame of four sequences, and whether its launches specialise like the single sequence's
(one compiled variant for both) is reported.
"""

from __future__ import annotations

import inspect
import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import flexpbs.kernels.antidiagonal as antidiagonal
import flexpbs.kernels.importance as importance
import flexpbs.kernels.rows as rows_module
from flexpbs.lengths import SequenceLengths
from flexpbs.rows import frame_layout, packed_layout

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_sm90(kernel, args: tuple, kwargs: dict):
    signature, constants, attrs, options = specialisation(kernel, args, kwargs)
    source = ASTSource(kernel, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def specialisation(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """``(signature, constants, attributes, options)`` of a launch: calls that agree share one compiled
    variant of the kernel."""
    kwargs = dict(kwargs)
    params = list(inspect.signature(kernel.fn).parameters)
    unspecialised = {params[i] if isinstance(i, int) else i for i in (kernel.do_not_specialize or ())}
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    kwargs["UPCAST"] = False  # the GPU feeds half inputs to tl.dot as they are (the CPU run upcasts)
    values = dict(zip(params[: len(args)], args, strict=True)) | kwargs
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(params):
        value = values[name]
        if name in kwargs:  # constexpr
            signature[name], constants[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(i,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif name not in unspecialised and value == 1:
            signature[name], constants[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if name not in unspecialised and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs, options


def global_loads(ptx: str) -> dict[str, int]:
    """Count of each global load instruction (``ld.global...``, ``cp.async...``) by its full opcode."""
    counts: dict[str, int] = {}
    pattern = r"^\s*(?:@%p\d+\s+)?((?:ld\.global|cp\.async\.c[ag]\.shared\.global)\S*)"
    for opcode in re.findall(pattern, ptx, re.M):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def main() -> None:
    n, q_heads, kv_heads, d = 131072, 32, 8, 128
    query = torch.empty(1, n, q_heads, d, dtype=torch.bfloat16).transpose(1, 2)
    key = torch.empty(1, n, kv_heads, d, dtype=torch.bfloat16).transpose(1, 2)
    recorded = {}
    names = ("_row_stats_kernel", "_merge_stats_kernel", "_column_mass_kernel")
    for name in names:
        setattr(importance, name, Recorder(getattr(importance, name)))
    importance.triton_last_block_importance(
        query, key, block_size=128, segment_size=256, scale=d**-0.5, per_query_head=False
    )
    # a frame of four sequences (a packed or padded batch) must reuse the single sequence's variants
    n_keys = torch.tensor([32768, 20000, 9000, 512])
    frame_q = torch.empty(4, n // 4, q_heads, d, dtype=torch.bfloat16).transpose(1, 2)
    frame_k = torch.empty(4, n // 4, kv_heads, d, dtype=torch.bfloat16).transpose(1, 2)
    importance.triton_last_block_importance(
        frame_q, frame_k, block_size=128, segment_size=256, scale=d**-0.5, per_query_head=False,
        lengths=SequenceLengths(n_keys, n_keys // 2, torch.tensor([False, False, False, True])),
    )  # fmt: skip
    shared = {}
    for name in names:
        recorded[name] = getattr(importance, name)
        single, frame = recorded[name].calls[:2]
        shared[name] = specialisation(recorded[name].kernel, *single) == specialisation(
            recorded[name].kernel, *frame
        )
    antidiagonal._antidiagonal_kernel = Recorder(antidiagonal._antidiagonal_kernel)
    blocks = n // 128
    first = torch.zeros(1, dtype=torch.int64)
    antidiagonal.launch(
        query, key, first_block=2, end_block=blocks, columns=blocks - 2,
        candidates=torch.full((blocks - 2,), blocks - 2, dtype=torch.int32), block_size=128, stride=32,
        scale=d**-0.5, lead=0, first_query=first, end_query=first + n,
    )  # fmt: skip
    recorded["_antidiagonal_kernel"] = antidiagonal._antidiagonal_kernel
    # the row copy into a frame of 4 sequences of 32K positions, and back (a packed batch's tokens)
    rows_module._copy_rows_kernel = Recorder(rows_module._copy_rows_kernel)
    packed = key.transpose(1, 2)[0]  # [N, H, D] rows
    frame = torch.empty(4, kv_heads, n // 4, d, dtype=torch.bfloat16)
    source = torch.arange(n, dtype=torch.int64)
    rows_module.triton_copy_rows(
        packed, packed_layout(packed), source, frame, frame_layout(frame), None, kv_heads, d
    )
    recorded["_copy_rows_kernel"] = rows_module._copy_rows_kernel
    report = {}
    for name, recorder in recorded.items():
        args, kwargs = recorder.calls[0]
        compiled = compile_sm90(recorder.kernel, args, dict(kwargs))
        report[name] = dict(loads=global_loads(compiled.asm["ptx"]), shared=compiled.metadata.shared)
    report["frames_share_variants"] = shared
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()

"""The Triton kernels as an H100 compiles them: q/K tiles must load in 16-byte vectors through the
software pipeline (cp.async). A stride Triton may not assume divisible makes every load element-wise
and unpipelined, with equal results: only the generated code shows it (PBS+'s selection took 64 instead
of 10 ms at 128K that way). Compiled for sm_90 on the CPU (Triton ships ptxas), outside the interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sm90_codegen.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("kernel", ["_row_stats_kernel", "_column_mass_kernel", "_antidiagonal_kernel"])
def test_q_and_k_tiles_load_in_16_byte_vectors_through_the_pipeline(report, kernel):
    loads = report[kernel]["loads"]
    assert not [op for op in loads if op.endswith((".b16", ".u16"))], loads  # element-wise bf16 loads
    assert loads.get("cp.async.cg.shared.global", 0) > 0, loads  # 16-byte asynchronous copies
    assert report[kernel]["shared"] > 0


def test_the_row_copy_kernel_moves_rows_in_16_byte_vectors(report):
    loads = report["_copy_rows_kernel"]["loads"]
    assert loads.get("ld.global.v4.b32", 0) > 0, loads  # 8 bf16 features per load
    assert not [op for op in loads if op.endswith((".b16", ".u16"))], loads


@pytest.mark.parametrize("kernel", ["_row_stats_kernel", "_merge_stats_kernel", "_column_mass_kernel"])
def test_frames_and_single_sequences_share_the_importance_kernels_compiled_variant(report, kernel):
    """Per-sequence lengths are a runtime flag, not a constexpr: the warm-up compiles each kernel once
    (a second variant compiled in the warm-up's thread while flash-attn-4 compiled, session 14)."""
    assert report["frames_share_variants"][kernel]

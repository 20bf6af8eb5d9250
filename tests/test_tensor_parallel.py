"""Tensor parallelism: transformers' tp_plan="auto" over 2 processes (gloo on CPU) with flexpbs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_heads_split_over_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "tp.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "examples" / "tensor_parallel.py"),
        "--threshold",
        "0.5",
        "--json",
        str(out),
    ]
    scratch = tmp_path / "tmp"  # the example's temporary model directory goes here
    scratch.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(scratch))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("flexpbs_tp_")]  # removed after use
    res = json.loads(out.read_text())
    assert "tensor parallelism matches one process" in proc.stdout  # the example's one-line verdict
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # no deprecated transformers API

    assert res["world_size"] == 2 and len(res["ranks"]) == 2
    assert res["max_logit_diff_threshold_1_vs_sdpa"] < 1e-4  # threshold 1.0 is dense attention
    assert res["max_logit_diff_vs_single_process"] < 1e-4  # sparse, same tiles per head
    densities = []
    for rank in res["ranks"]:
        assert rank["pbs_calls"] == 4  # 2 layers x 2 thresholds ran PBS, no fallback
        assert rank["density"] == rank["single_process_density"]  # each rank runs its own heads exactly
        densities += [d for layer in rank["density"].values() for d in layer]
    assert min(densities) < 0.9  # the split is tested on sparse selections, not only dense ones

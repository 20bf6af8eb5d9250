"""Tensor-parallel prefill with flexpbs: heads split over processes by transformers' ``tp_plan="auto"``.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py   # GPUs (NCCL) or CPU (gloo)
    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --model DIR --tokens 65536

Every rank loads the model with ``tp_plan="auto"`` and ``attn_implementation="flexpbs"``: the q/k/v
projections are split by heads, so each rank runs ``flexpbs.attention`` on its own query heads and
their KV heads, with no communication inside attention (PBS is per head). Rank 0 also runs the whole
model in one process and compares: logits at threshold 1.0 vs SDPA, logits at ``--threshold`` vs the
single-process flexpbs run, and each rank's per-layer density vs the single-process density of the
same heads. Without ``--model`` a tiny random Llama (8 query, 4 KV heads) is used. Rank 0 prints one
PASS/FAIL line per check and a one-line verdict; ``--json`` writes the numbers (rank 0).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import transformers

import flexpbs.integrations.transformers as fx


def tiny_llama_dir() -> str:
    """Rank 0 saves a tiny random Llama; every rank gets its directory."""
    path = [tempfile.mkdtemp(prefix="flexpbs_tp_") if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=32,
            max_position_embeddings=4096,
        )
        transformers.LlamaForCausalLM(config).save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    return path[0]


def tensor_parallel_kwargs() -> dict:
    """``from_pretrained`` arguments for ``tp_plan="auto"``: inside ``distributed_config`` where
    transformers' DistributedConfig takes a tp_plan (newer versions deprecate the bare keyword)."""
    config = getattr(transformers, "DistributedConfig", None)
    if config is not None and "tp_plan" in inspect.signature(config).parameters:
        return {"distributed_config": config(tp_plan="auto")}
    return {"tp_plan": "auto"}


def verdict(results: dict, dtype: torch.dtype) -> list[str]:
    """One line per check, each PASS or FAIL against its tolerance (relative to the largest logit:
    float32 rounding on CPU, bfloat16's on GPUs)."""
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * results["logit_scale"]
    same_density = all(r["density"] == r["single_process_density"] for r in results["ranks"])
    checks = [
        (
            "threshold 1.0 equals SDPA",
            results["max_logit_diff_threshold_1_vs_sdpa"] <= tol,
            f"max logit diff {results['max_logit_diff_threshold_1_vs_sdpa']:.2e} <= {tol:.2e}",
        ),
        (
            f"threshold {results['threshold']} equals one process",
            results["max_logit_diff_vs_single_process"] <= tol,
            f"max logit diff {results['max_logit_diff_vs_single_process']:.2e} <= {tol:.2e}",
        ),
        ("each rank's per-head density equals one process's", same_density, "exact"),
    ]
    return [f"{'PASS' if ok else 'FAIL'}: {name} ({detail})" for name, ok, detail in checks]


def prefill(
    model, ids: torch.Tensor, pbs: fx.FlexPBSAttention
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits and the per-layer, per-head density ``{layer: [Hq_local]}`` of one prefill."""
    density: dict[int, torch.Tensor] = {}
    pbs.on_stats = lambda layer, stats: density.__setitem__(layer, stats.density[0].float().cpu())
    with torch.no_grad():
        logits = model(ids).logits.float()
    pbs.on_stats = None
    return logits, density


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model directory (default: a tiny random Llama)")
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    path = args.model or tiny_llama_dir()
    dtype = torch.bfloat16 if cuda else torch.float32
    pbs = fx.register(block_size=64, segment_size=128)
    vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
    ids = torch.randint(vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(device)

    results: dict = {"world_size": world, "tokens": args.tokens, "threshold": args.threshold, "ranks": []}
    tp = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="flexpbs", **tensor_parallel_kwargs()
    ).eval()
    q_heads = tp.config.num_attention_heads
    local_heads = q_heads // world
    tp_logits, tp_density = {}, {}
    for threshold in (1.0, args.threshold):
        tp.config.flexpbs = {"threshold": threshold}
        tp_logits[threshold], tp_density[threshold] = prefill(tp, ids, pbs)
    local = {str(layer): d.tolist() for layer, d in tp_density[args.threshold].items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "pbs_calls": pbs.calls["pbs"], "density": local})

    if rank == 0:
        single = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        single.set_attn_implementation("sdpa")
        with torch.no_grad():
            sdpa_logits = single(ids).logits.float()
        single.set_attn_implementation("flexpbs")
        single.config.flexpbs = {"threshold": args.threshold}
        single_logits, single_density = prefill(single, ids, pbs)
        results["max_logit_diff_threshold_1_vs_sdpa"] = (tp_logits[1.0] - sdpa_logits).abs().max().item()
        results["max_logit_diff_vs_single_process"] = (
            (tp_logits[args.threshold] - single_logits).abs().max().item()
        )
        results["logit_scale"] = sdpa_logits.abs().max().item()
        for entry in gathered:
            heads = slice(entry["rank"] * local_heads, (entry["rank"] + 1) * local_heads)
            entry["single_process_density"] = {
                str(layer): d[heads].tolist() for layer, d in single_density.items()
            }
            results["ranks"].append(entry)
        lines = verdict(results, dtype)
        results["verdict"] = lines
        print("\n".join(lines))
        print(
            "tensor parallelism "
            + ("matches one process" if all(x.startswith("PASS") for x in lines) else "FAILED")
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f)
    dist.barrier()
    if rank == 0 and not args.model:  # the tiny model's directory (every rank is done with it)
        shutil.rmtree(path, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

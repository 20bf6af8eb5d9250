"""Per head, on SmolLM2 q/k/v captured from a dense 4K run of the licenses text: output error of PBS and of
no permutation (threshold 0.9, segment 256) and simple head statistics (bench/QUALITY.md, "Beyond the paper").

    PYTHONPATH=$PWD python bench/quality_heads.py   # writes bench/quality/beyond_heads_licenses_4096.json

Fields per (layer, query head): dp / dn density with / without permutation; harm = mean relative output
error with permutation minus without; local = attention share of the 256 keys before a query, sink = share
of tokens 0-3, ent = entropy, all over 128 query rows spread over the sequence.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

import flexpbs  # noqa: E402

QKV = Path(os.environ.get("QKV", "/tmp/qkv_licenses_4096.pt"))
OUT = Path(__file__).resolve().parent / "quality" / "beyond_heads_licenses_4096.json"


def capture() -> None:
    tok, model, _ = Q.load_model()
    Q.use(model, Q.Method("dense", None))
    Q.RECORDER.capture = True
    with torch.no_grad():
        model(Q.text_ids(tok, Q.texts()["licenses"], 4096))
    torch.save({i: tuple(t.half() for t in qkv) for i, qkv in Q.RECORDER.captured.items()}, QKV)


def main() -> None:
    if not QKV.exists():
        capture()
    rows = []
    for layer, (q, k, v) in sorted(torch.load(QKV).items()):
        q, k, v = q.float(), k.float(), v.float()
        n, group = q.shape[2], q.shape[1] // k.shape[1]
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        res = {}
        for perm in ("sorted", "original"):
            out, st = flexpbs.attention(q, k, v, threshold=0.9, key_order=perm, return_stats=True)
            err = (out - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-6)
            res[perm] = (err[0].mean(-1), st.density[0])
        pos = torch.linspace(256, n - 1, 128).long()
        kpos = torch.arange(n)
        for h in range(q.shape[1]):
            logits = (q[0, h, pos] @ k[0, h // group].T) * q.shape[-1] ** -0.5
            p = logits.masked_fill(kpos[None] > pos[:, None], float("-inf")).softmax(-1)
            rows.append(dict(
                layer=layer, head=h,
                local=(p * (kpos[None] > pos[:, None] - 256)).sum(-1).mean().item(),
                sink=p[:, :4].sum(-1).mean().item(),
                ent=-(p.clamp_min(1e-12).log() * p).sum(-1).mean().item(),
                harm=(res["sorted"][0][h] - res["original"][0][h]).item(),
                dp=res["sorted"][1][h].item(), dn=res["original"][1][h].item()))
    OUT.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()

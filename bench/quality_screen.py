"""Prototype screen of candidate modes beyond the paper inside SmolLM2 (bench/QUALITY.md, "Beyond the paper").

Prototype code, not the library: each candidate is assembled from flexpbs's stage functions so that it
could be measured before it was implemented. The two that were implemented (the head guard,
``max_shrink``, and ``exact_last_block``) give bit-identical outputs to this prototype on captured
SmolLM2 q/k/v. One JSON line per run is appended to --out.

    PYTHONPATH=$PWD python bench/quality_screen.py --out screen.jsonl \
        --modes '[["guard0.1", 0.9, 256, {"kind": "adaptive_density", "denser": 0.1}]]'
    # --passkey 6: passkey accuracy (the haystack and seeds of bench/quality.py) instead of perplexity

A mode is [label, threshold, segment, options]; options: kind = pbs | noperm | partial (m: keys moved
per segment) | adaptive_density (denser: largest tile saving a head may keep its sort with; without
it, the sparser order per head) | adaptive_gain (r) | adaptive_recall | recent (k); W: force the
blocks holding the W keys before each query block; strided / w_last: importance also from strided
queries; anti: XAttention-style antidiagonal scoring with this stride; last: exact last block;
noperm_layers: layers run without permutation.
"""
import json, sys, time, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, torch.nn.functional as F
import quality as Q
from flexpbs.importance import last_block_importance
from flexpbs.permutation import segment_permutation, identity_permutation, permute_kv, block_position_bounds
from flexpbs.selection import select_tiles
from flexpbs.sparse_attention import sparse_attention

B = 128
MODE = {}

def partial_perm(imp, n, S, m):
    b, h, nc = imp.shape
    seg = imp.view(b, h, nc // S, S)
    order = torch.sort(seg, dim=-1, descending=True, stable=True).indices
    key = torch.arange(S, dtype=torch.float64).expand_as(seg).clone() + S
    rank = torch.arange(m, dtype=torch.float64).expand(b, h, nc // S, m)
    key.scatter_(-1, order[..., :m], rank)
    within = torch.sort(key, dim=-1, stable=True).indices
    starts = torch.arange(0, nc, S).view(1, 1, -1, 1)
    return torch.cat([(within + starts).view(b, h, nc), torch.arange(nc, n).expand(b, h, -1)], -1)

def window_tiles(perm, n, W, nb):
    # [B,Hp,nb,nb]: permuted block holds a key in [first_q - W, first_q)
    pos = torch.arange(n)
    first_q = torch.arange(nb) * B
    out = torch.zeros(*perm.shape[:2], nb, nb, dtype=torch.bool)
    for i in range(nb):
        lo, hi = max(0, first_q[i] - W), first_q[i]
        if hi <= lo: continue
        hit = (perm >= lo) & (perm < hi)  # [B,Hp,N]
        blocks = F.pad(hit, (0, nb * B - n)).view(*perm.shape[:2], nb, B).any(-1)
        out[:, :, i] = blocks
    return out


def multi_importance(q, k, S, scale, n_strided, w_last):
    """last-block importance (weight w_last) + causal importance from strided query rows (weight 1-w_last)."""
    n = q.shape[2]; Hq, Hk = q.shape[1], k.shape[1]; G = Hq // Hk
    nc = n // S * S
    last = last_block_importance(q, k, block_size=B, segment_size=S, scale=scale, per_query_head=False)
    if n_strided == 0:
        return last
    pos = torch.linspace(S, n - B - 1, n_strided).long()
    qs = q[:, :, pos].float().view(q.shape[0], Hk, G, n_strided, -1)
    logits = torch.einsum("bkgrd,bknd->bkgrn", qs, k.float()) * scale
    logits = logits.masked_fill(torch.arange(n)[None, :] > pos[:, None], float("-inf"))
    p = logits.softmax(-1)[..., :nc].sum(-2).mean(2) / n_strided
    return w_last * last + (1 - w_last) * p


from flexpbs.selection import candidate_tiles, threshold_tiles, forced_tiles
def antidiag_tiles(q, kp, perm, S, thr, scale, stride):
    b, Hq, n, d = q.shape; Hp = kp.shape[1]; G = Hq // Hp
    nb = -(-n // B); pad = nb * B - n
    qq = F.pad(q.float(), (0, 0, 0, pad)); kk = F.pad(kp.float(), (0, 0, 0, pad))
    # row a: queries a*s + s-1-u ; col c: keys c*s + u
    qr = qq.unflatten(2, (-1, stride)).flip(3).flatten(3)          # [b,Hq,N/s,s*d]
    kr = kk.unflatten(2, (-1, stride)).flatten(3)                  # [b,Hp,N/s,s*d]
    cand = candidate_tiles(nb, B, S, q.device)
    per = B // stride
    cand_r = cand.repeat_interleave(per, 0).repeat_interleave(per, 1)
    probs = torch.zeros(b, Hq, nb, nb)
    for h in range(Hq):
        logits = (qr[:, h] @ kr[:, h // G].transpose(-1, -2)) * scale / stride
        p = logits.masked_fill(~cand_r, float("-inf")).softmax(-1).nan_to_num(0.0)
        probs[:, h] = p.unflatten(1, (nb, per)).sum(2).unflatten(-1, (nb, per)).sum(-1) / per
    t = threshold_tiles(probs, cand, thr)
    return t | forced_tiles(perm, B, S).repeat_interleave(Hq // perm.shape[1], 1)


def sampled_recall(q, k, perm, t, S, scale, n_rows):
    """[b,Hp]: mean over sampled query rows (and the group's query heads) of true attention mass inside selected tiles."""
    b, Hq, n, d = q.shape; Hk = k.shape[1]; G = Hq // Hk; Hp = perm.shape[1]
    pos = torch.linspace(S, n - 1, n_rows).long()
    qs = q[:, :, pos].float().view(b, Hk, G, n_rows, d)
    logits = torch.einsum("bkgrd,bknd->bkgrn", qs, k.float()) * scale
    p = logits.masked_fill(torch.arange(n)[None, :] > pos[:, None], float("-inf")).softmax(-1)  # orig key order
    # tile selected for (row's block, slot of key j): inverse perm
    inv = torch.empty_like(perm); inv.scatter_(-1, perm, torch.arange(n).expand_as(perm).contiguous())
    slot_block = inv // B   # [b,Hp,N] permuted block of each original key
    tt = t.view(b, Hk, G, t.shape[-2], t.shape[-1])[:, :, :, pos // B]  # [b,Hk,G,R,nb]
    sel = tt.gather(-1, slot_block.view(b, Hk, 1, 1, n).expand(b, Hk, G, n_rows, n))
    return (p * sel).sum(-1).mean((-1, -2))


def last_exact(imp, perm, t, S, thr):
    """Union the last query block's row with a threshold selection on the exact last-block block mass."""
    b, Hp, nc = imp.shape; n = perm.shape[-1]; nb = t.shape[-1]; G = t.shape[1] // Hp
    imp_slots = imp.gather(-1, perm[..., :nc])
    mass = F.pad(imp_slots, (0, nb * B - nc)).view(b, Hp, nb, B).sum(-1)  # [b,Hp,nb]
    seg = torch.arange(nb) // (S // B)
    cand = seg < seg[-1]
    mass = mass * cand
    probs = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    row = threshold_tiles(probs[:, :, None, :], cand[None, :].expand(nb, nb)[-1:], thr)[:, :, 0]
    t = t.clone()
    t[:, :, -1] |= row.repeat_interleave(G, 1)
    return t

def pbs(q, k, v, scale, thr, S, mode):
    n = q.shape[2]; Hq, Hk = q.shape[1], k.shape[1]; G = Hq // Hk
    nb = -(-n // B)
    kind = mode.get("kind", "pbs")
    ident = identity_permutation(1, Hk, n, q.device)
    def tiles_for(perm):
        kp, vp = permute_kv(k, v, perm)
        if mode.get("anti"):
            t = antidiag_tiles(q, kp, perm, S, thr, scale, mode["anti"])
        else:
            t = select_tiles(q, kp, perm, block_size=B, segment_size=S, threshold=thr, scale=scale)
        return t, kp, vp
    if kind == "noperm":
        perm = ident
    else:
        imp = multi_importance(q, k, S, scale, mode.get("strided", 0), mode.get("w_last", 1.0))
        if kind == "partial":
            perm = partial_perm(imp, n, S, mode["m"])
        else:
            perm = segment_permutation(imp, n, S)
        if kind == "recent":
            keep = max(0, n // S * S - mode["k"] * S)
            perm[..., keep:] = ident[..., keep:]
        if kind == "adaptive_density":
            t1, _, _ = tiles_for(perm); t0, _, _ = tiles_for(ident)
            c1 = t1.view(1, Hk, G, -1).sum((2, 3)); c0 = t0.view(1, Hk, G, -1).sum((2, 3))
            use = (c1.float() <= c0.float() * mode.get("r", 1.0))
            if mode.get("denser") is not None:
                use = c1.float() >= c0.float() * (1 - mode["denser"])
            perm = torch.where(use[..., None], perm, ident)
            MODE.setdefault("_use", []).append(use.float().mean().item())
        if kind == "adaptive_recall":
            t1, _, _ = tiles_for(perm); t0, _, _ = tiles_for(ident)
            r1 = sampled_recall(q, k, perm, t1, S, scale, mode.get("rows", 128))
            r0 = sampled_recall(q, k, ident, t0, S, scale, mode.get("rows", 128))
            use = r1 >= r0 - mode.get("eps", 0.0)
            perm = torch.where(use[..., None], perm, ident)
            MODE.setdefault("_use", []).append(use.float().mean().item())
        if kind == "adaptive_gain":
            # blocks needed to cover tau of importance mass over complete segments, sorted vs original
            nc = imp.shape[-1]
            def need(x):
                bm = x.view(1, Hk, nc // B, B).sum(-1)
                s = bm.sort(-1, descending=True).values.cumsum(-1)
                return (s < mode.get("tau", 0.9) * s[..., -1:]).sum(-1) + 1
            sorted_imp = imp.gather(-1, perm[..., :nc])
            ratio = need(sorted_imp).float() / need(imp).float()
            use = ratio <= mode["r"]
            perm = torch.where(use[..., None], perm, ident)
            MODE.setdefault("_use", []).append(use.float().mean().item())
    t, kp, vp = tiles_for(perm)
    if mode.get("last"):
        if kind == "noperm":
            imp = last_block_importance(q, k, block_size=B, segment_size=S, scale=scale, per_query_head=False)
        t = last_exact(imp, perm, t, S, thr)
    if kind == "localwin" or mode.get("W"):
        wt = window_tiles(perm, n, mode["W"], nb).repeat_interleave(Hq // perm.shape[1], 1)
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        t = t | (wt & causal)
    out = sparse_attention(q, kp, vp, t, perm, block_size=B, segment_size=S, scale=scale)
    dens = t.sum((-2, -1), dtype=torch.float32) / (nb * (nb + 1) / 2)
    return out, dens

CUR = {"thr": None}
def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    prefill = query.shape[2] == key.shape[2] and query.shape[2] > 1
    if CUR["thr"] is None or not prefill or query.shape[2] <= CUR["S"]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    mode = CUR["mode"]
    if module.layer_idx in mode.get("noperm_layers", ()):
        mode = {**mode, "kind": "noperm"}
    out, dens = pbs(query, key, value, scaling, CUR["thr"], CUR["S"], mode)
    Q.RECORDER.density[module.layer_idx] = dens[0]
    return out.transpose(1, 2).contiguous(), None

def main():
    from transformers import AttentionInterface
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096); p.add_argument("--text", default="licenses")
    p.add_argument("--modes", required=True, help="json list of [label, thr, S, mode]")
    p.add_argument("--passkey", type=int, default=0); p.add_argument("--out", required=True)
    a = p.parse_args()
    tok, model, _ = Q.load_model()
    AttentionInterface.register("proto", attn); model.set_attn_implementation("proto")
    ids = Q.text_ids(tok, Q.texts()[a.text], a.n)
    res = []
    for label, thr, S, mode in json.loads(a.modes):
        CUR.update(thr=thr, S=S, mode=mode); MODE.clear(); Q.RECORDER.density.clear()
        t0 = time.time()
        row = dict(label=label, thr=thr, S=S, mode=mode, n=a.n, text=a.text)
        if a.passkey:
            hay = Q.text_ids(tok, Q.texts()[a.text], a.n)
            acc, dens = Q.passkey_accuracy(model, tok, hay, a.n, a.passkey, 0 + a.n)
            row.update(passkey=acc, density=dens, trials=a.passkey)
        else:
            ppl, tail, dens = Q.perplexity(model, ids)
            row.update(ppl=ppl, ppl_tail=tail, density=dens)
        row["use"] = sum(MODE["_use"]) / len(MODE["_use"]) if MODE.get("_use") else None
        row["seconds"] = time.time() - t0
        print(json.dumps(row), flush=True)
        res.append(row)
        with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")

if __name__ == "__main__":
    main()

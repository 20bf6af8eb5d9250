"""Tables and plots from ``python -m bench quality run`` results.

    python -m bench quality report RESULTS.json [RESULTS.json ...] --out bench_out/quality
    python -m bench quality report OUT/results.json --picture OUT/qkv_licenses_4096.pt 12 3

Writes tradeoff plots (density vs perplexity per method, ``tradeoff_{text}_{N}.png``), passkey accuracy
against density (``passkey_{N}.png``), per-layer density (``layer_density_{text}_{N}.png``), the
block-mask picture of one head before and after permutation (``--picture``, from the q/k/v saved next to
the results: ``block_mask_layer{L}_head{H}.png``), and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from matplotlib.figure import Figure  # figures for files: no pyplot state, no GUI backend

import flexpbs
from flexpbs import plot


def load(paths: list[Path], segment: int | None = None) -> dict:
    """Merge results files; with ``segment``, keep dense and the methods of that segment size only."""
    merged: dict = {"perplexity": [], "passkey": [], "layers": [], "texts": {}, "sources": []}

    def keep(row: dict) -> bool:
        if segment is None:
            return True
        family = row.get("family")
        if family is not None:
            return family == "dense" or family.endswith(f"segment {segment}")
        return f"-s{segment}-" in row["method"]  # per-layer rows carry the method label only

    for p in paths:
        r = json.loads(p.read_text())
        for key in ("perplexity", "passkey", "layers"):
            merged[key] += [row for row in r[key] if keep(row)]
        merged["texts"].update(r["texts"])
        merged["sources"].append(str(p))
    return merged


def perplexity_tables(r: dict) -> str:
    """Markdown: perplexity of every method, per (length, text)."""
    out = []
    groups = defaultdict(list)
    for row in r["perplexity"]:
        groups[(row["n"], row["text"])].append(row)
    for (n, text), rows in sorted(groups.items()):
        out.append(
            f"\n**{text}, {n} tokens**\n\n| method | density | perplexity | last 512 |\n|---|---|---|---|"
        )
        for row in rows:
            out.append(
                f"| {row['method']} | {row['density']:.3f} | {row['ppl']:.2f} | {row['ppl_tail']:.2f} |"
            )
    return "\n".join(out)


def wilson_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate: sound at 0 or all hits and for few trials."""
    if trials == 0:
        return 0.0, 1.0
    p = hits / trials
    center = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, center - half), min(1.0, center + half)


def _hits(row: dict) -> int:
    """A retrieval row's hits (files from before hits were stored have the accuracy only)."""
    return row.get("hits", round(row["accuracy"] * row["trials"]))


def passkey_table(r: dict) -> str:
    """Markdown: retrieval hits per (task, length, method), with 95% Wilson intervals."""
    out = ["| task | tokens | method | density | hits / trials | 95% interval |", "|---|---|---|---|---|---|"]
    for row in r["passkey"]:
        hits = _hits(row)
        low, high = wilson_interval(hits, row["trials"])
        out.append(
            f"| {row.get('task', 'passkey')} | {row['n']} | {row['method']} | {row['density']:.3f} | "
            f"{hits}/{row['trials']} | {low:.2f}-{high:.2f} |"
        )
    return "\n".join(out)


def pooled_passkey_table(r: dict) -> str:
    """Markdown: retrieval hits pooled over the runs of each (task, length, method) that several results
    files hold (other seeds: other prompts), with 95% Wilson intervals; "" when no method repeats."""
    groups = defaultdict(list)
    for row in r["passkey"]:
        groups[(row.get("task", "passkey"), row["n"], row["method"])].append(row)
    out = []
    for (task, n, method), rows in groups.items():
        if len(rows) < 2:
            continue
        hits = sum(_hits(row) for row in rows)
        trials = sum(row["trials"] for row in rows)
        density = sum(row["density"] * row["trials"] for row in rows) / trials
        low, high = wilson_interval(hits, trials)
        out.append(
            f"| {task} | {n} | {method} | {len(rows)} | {density:.3f} | {hits}/{trials} | "
            f"{low:.2f}-{high:.2f} |"
        )
    if not out:
        return ""
    head = [
        "| task | tokens | method | runs | density | hits / trials | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + out)


def layer_table(r: dict) -> str:
    """Markdown: density, recall and relative error averaged over layers and heads, per method."""
    agg = defaultdict(list)
    for row in r["layers"]:
        agg[(row["n"], row["text"], row["method"])].append(row)
    out = [
        "| tokens | text | method | mean density | mean recall | min recall | mean rel. error "
        "| max rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (n, text, method), rows in sorted(agg.items()):
        d = [x["density"] for x in rows]
        rec = [x["recall"] for x in rows]
        err = [x["rel_error"] for x in rows]
        out.append(
            f"| {n} | {text} | {method} | {sum(d) / len(d):.3f} | {sum(rec) / len(rec):.4f} | {min(rec):.3f} "
            f"| {sum(err) / len(err):.4f} | {max(err):.3f} |"
        )
    return "\n".join(out)


def per_head_effect(r: dict, tol: float = 0.005) -> str:
    """Share of heads whose density permutation lowers / leaves within ``tol`` / raises, per setting."""
    by_key = {}
    for row in r["layers"]:
        by_key[(row["n"], row["text"], row["method"], row["layer"], row["head"])] = row
    out = [
        "| tokens | text | setting | heads | density lower with PBS | unchanged | higher | "
        "mean recall PBS / no perm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    settings = sorted({(k[0], k[1], k[2][len("PBS-") :]) for k in by_key if k[2].startswith("PBS-")})
    for n, text, setting in settings:
        pairs = [
            (v, by_key.get((n, text, "noperm-" + setting, k[3], k[4])))
            for k, v in by_key.items()
            if k[:3] == (n, text, "PBS-" + setting)
        ]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if not pairs:
            continue
        diff = [a["density"] - b["density"] for a, b in pairs]
        lower = sum(d < -tol for d in diff) / len(diff)
        higher = sum(d > tol for d in diff) / len(diff)
        rec_a = sum(a["recall"] for a, _ in pairs) / len(pairs)
        rec_b = sum(b["recall"] for _, b in pairs) / len(pairs)
        out.append(
            f"| {n} | {text} | {setting} | {len(pairs)} | {lower:.1%} | "
            f"{1 - lower - higher:.1%} | {higher:.1%} "
            f"| {rec_a:.4f} / {rec_b:.4f} |"
        )
    return "\n".join(out)


def tradeoff_plots(r: dict, out: Path, prefix: str = "") -> None:
    """``{prefix}tradeoff_{text}_{N}.png``: density against perplexity (all tokens, last 512) per family."""
    groups = defaultdict(list)
    for row in r["perplexity"]:
        groups[(row["n"], row["text"])].append(row)
    for (n, text), rows in groups.items():
        fig = Figure(figsize=(10, 3.6))
        axes = fig.subplots(1, 2)
        dense = next(x for x in rows if x["family"] == "dense")
        for ax, key, label in (
            (axes[0], "ppl", "perplexity, all tokens"),
            (axes[1], "ppl_tail", "perplexity, last 512"),
        ):
            points = defaultdict(list)
            for x in rows:
                if x["family"] != "dense":
                    points[x["family"]].append((x["density"], x[key]))
            plot.tradeoff(points, ylabel=label, baseline=dense[key], ax=ax, title=f"{text}, {n} tokens")
        fig.tight_layout()
        fig.savefig(out / f"{prefix}tradeoff_{text}_{n}.png", dpi=110)


def passkey_plot(r: dict, out: Path, prefix: str = "") -> None:
    """``{prefix}{task}_{N}.png``: density against retrieval accuracy per family (task passkey or uuid)."""
    groups = defaultdict(list)
    for row in r["passkey"]:
        groups[(row.get("task", "passkey"), row["n"])].append(row)
    for (task, n), rows in groups.items():
        fig = Figure(figsize=(5, 3.4))
        ax = fig.subplots()
        points = defaultdict(list)
        for x in rows:
            if x["family"] != "dense":
                points[x["family"]].append((x["density"], x["accuracy"]))
        dense = next((x["accuracy"] for x in rows if x["family"] == "dense"), None)
        trials = rows[0]["trials"]
        plot.tradeoff(
            points,
            ylabel=f"{task} accuracy ({trials} trials)",
            baseline=dense,
            ax=ax,
            title=f"{task}, {n} tokens",
        )
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{task}_{n}.png", dpi=110)


def layer_density_plot(r: dict, out: Path, threshold: str = "t0.9") -> None:
    """``layer_density_{text}_{N}.png``: mean density per layer of each method at ``threshold``."""
    series = defaultdict(lambda: defaultdict(list))
    keys = set()
    for row in r["layers"]:
        if row["method"].endswith(threshold):
            series[(row["n"], row["text"])][row["method"]].append((row["layer"], row["density"]))
    for (n, text), methods in series.items():
        fig = Figure(figsize=(6, 3.4))
        ax = fig.subplots()
        per_method = {}
        for m, pts in methods.items():
            by_layer = defaultdict(list)
            for layer, d in pts:
                by_layer[layer].append(d)
            per_method[m] = [sum(by_layer[i]) / len(by_layer[i]) for i in sorted(by_layer)]
        plot.density_by_layer(
            per_method, ax=ax, title=f"density per layer, {text}, {n} tokens, threshold 0.9"
        )
        fig.tight_layout()
        fig.savefig(out / f"layer_density_{text}_{n}.png", dpi=110)
        keys.add((n, text))


def mask_picture(qkv_path: Path, out: Path, layer: int, head: int) -> None:
    """``block_mask_layer{L}_head{H}.png``: one head's tiles over its block attention mass (log scale), in
    original order and after permutation, from q/k/v captured by ``quality run``."""
    captured = torch.load(qkv_path)
    q, k, v = (t.float() for t in captured[layer])
    fig = Figure(figsize=(9, 4.4))
    axes = fig.subplots(1, 2)
    for ax, perm_mode, title in (
        (axes[0], "original", "original order"),
        (axes[1], "sorted", "after permutation"),
    ):
        _, stats = flexpbs.attention(
            q, k, v, threshold=0.9, key_order=perm_mode, min_seq_len=0, return_stats=True
        )
        group = q.shape[1] // k.shape[1]
        perm = stats.key_positions[0, head // (q.shape[1] // stats.key_positions.shape[1])]
        mass = plot.tile_attention_mass(q[0, head], k[0, head // group], perm, 128)
        plot.tiles(
            stats.tiles[0, head],
            mass=mass.clamp_min(1e-6).log10(),
            ax=ax,
            title=f"layer {layer} head {head}, {title}",
        )
    fig.tight_layout()
    fig.savefig(out / f"block_mask_layer{layer}_head{head}.png", dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    parser.add_argument("--picture", nargs=3, metavar=("QKV_PT", "LAYER", "HEAD"))
    parser.add_argument("--segment", type=int, help="only dense and the methods of this segment size")
    parser.add_argument("--prefix", default="", help="prefix of the plot file names")


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    r = load(args.results, args.segment)
    tradeoff_plots(r, args.out, args.prefix)
    passkey_plot(r, args.out, args.prefix)
    if r["layers"] and args.segment is None:  # the per-layer plots compare both segment sizes
        layer_density_plot(r, args.out)
    if args.picture:
        mask_picture(Path(args.picture[0]), args.out, int(args.picture[1]), int(args.picture[2]))
    print("## Perplexity\n" + perplexity_tables(r))
    print("\n## Passkey\n" + passkey_table(r))
    pooled = pooled_passkey_table(r)
    if pooled:
        print("\n## Passkey, pooled over runs\n" + pooled)
    print("\n## Per layer and head (averages over layers and heads)\n" + layer_table(r))
    print(
        "\n## Per head: does permutation lower the density? (same threshold and segment)\n"
        + per_head_effect(r)
    )

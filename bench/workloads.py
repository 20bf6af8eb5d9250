"""Benchmark inputs, the harness's only source of q/k/v: two synthetic generators and captured real q/k/v.

:func:`synthetic_qkv` builds q/k/v whose attention has what makes real prefill attention sparse,
each part with its own knob (see :class:`Synthetic`):

- an attention sink: key 0 gets a large logit from every query;
- a local band: a RoPE-like relative term (a sum of cosines of the query-key distance over
  log-spaced frequencies) that peaks at the diagonal and decays over ``band_width`` tokens;
- heavy-hitter keys shared by many queries, scattered inside "passages": segments of 256 tokens
  of which a share ``heavy_fraction`` of the keys (not contiguous) carry one of ``topics``
  directions, with a log-normal (heavy-tailed) passage strength. Each query looks for a mixture of
  topics that drifts along the sequence, so the last query block sees only part of what earlier
  blocks need. The passage count grows as ``(N / 256) ** passage_exponent``, so the share of key
  blocks that matter falls with length, as in long-context models;
- per-head variety: every head draws its own sink, band and topic strengths, so some heads are
  local, some retrieval-like and some diffuse.

The defaults are calibrated (``python -m bench calibrate``, CPU, selection stages only, at the harness
shape: 32 query / 8 KV heads, D=128) so that PBS at threshold 0.9 with block 128 / segment 256 lands near
the paper's operating point (about 40% of causal tiles at 32K and 22% at 128K), with no-permutation
selection denser. Measured: PBS 0.479 / 0.398 / 0.361 / 0.217 / 0.244 at 8K / 16K / 32K / 64K / 128K; no
permutation 0.531 / 0.490 / 0.470 / 0.373 / 0.403 (seed 0, the harness's input). Over six draws
(``--seeds 0 1 2 3 4 5``) the PBS mean is 0.332 at 32K and 0.247 at 128K. The density is a steep
function of the knobs (the heavy-hitter share of the mass crossing the threshold) and of the random draws
they lead to: neighbouring passage counts gave PBS 0.27-0.42 at 32K and 0.19-0.33 at 128K, so each
density is one draw; the harness reports it next to every time, ``python -m bench speed --densities``
times any density directly (attention stage) and ``--target-density`` runs whole calls at the threshold
that gives a chosen density.

:func:`stress_qkv` makes the inputs of the correctness runs at scale (``stress``, ``robustness``):
directly on the device in the target dtype, one head at a time, so that 512K-token batches need no
float32 copy (``synthetic_qkv`` builds in float32 on the CPU, 17 GiB for q alone at B=2, N=512K), with
magnitude and outlier-channel knobs for the numerics checks. Its attention is LLM-like but not calibrated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch


@dataclass(frozen=True)
class Synthetic:
    """Knobs of the synthetic LLM-like workload (logit units are q.k / sqrt(D))."""

    sink_logit: float = 8.0  # mean logit every query gives key 0
    band_logit: float = 6.0  # mean logit of the local band at distance 0
    band_width: int = 96  # tokens over which the band decays
    topics: int = 4  # heavy-hitter directions per KV head
    passage_scale: float = 1.0  # passages (segments holding heavy keys) = scale * (N/256) ** exponent
    passage_exponent: float = 0.65
    heavy_fraction: float = 0.3  # share of a passage's tokens that are heavy keys, scattered in it
    heavy_logit: float = 3.5  # median logit of a heavy key for a query fully on its topic
    passage_spread: float = 1.0  # log-normal spread of passage strengths (heavy-tailed importance)
    topic_drift: int = 4096  # tokens over which a query's topic mixture changes
    noise_logit: float = 1.0  # std of the random part of every logit
    head_spread: float = 0.5  # per-head log-normal spread of the sink/band/topic strengths


def synthetic_spec(overrides: list[str]) -> Synthetic:
    """The default :class:`Synthetic` with ``KNOB=VALUE`` overrides (command-line form)."""
    knobs = {f.name for f in fields(Synthetic)}
    values = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in knobs:
            raise ValueError(
                f"spec overrides must be KNOB=VALUE with KNOB one of {sorted(knobs)}, got {item!r}"
            )
        values[name] = type(getattr(Synthetic(), name))(value)
    return Synthetic(**values)


def synthetic_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    spec: Synthetic = Synthetic(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, N, D]``, k and v ``[B, Hkv, N, D]`` with LLM-like attention (module docstring).

    Built in float32 on the CPU from one seeded generator (identical on every machine), then cast.
    """
    n_freq = 8
    special = 2 * n_freq + 1 + spec.topics  # band, sink, topics
    if head_dim < special + 8:
        raise ValueError(f"head_dim must be >= {special + 8} for this workload, got {head_dim}")
    gen = torch.Generator().manual_seed(seed)
    root = head_dim**0.5

    def per_head(heads: int) -> torch.Tensor:  # [B, H, 1] log-normal strength multipliers
        return torch.exp(spec.head_spread * torch.randn(batch, heads, 1, generator=gen))

    # Random part: logit std noise_logit from the remaining dims.
    rest = head_dim - special
    sigma = (spec.noise_logit * root / rest**0.5) ** 0.5
    q = torch.zeros(batch, q_heads, seq_len, head_dim)
    k = torch.zeros(batch, kv_heads, seq_len, head_dim)
    q[..., special:] = sigma * torch.randn(batch, q_heads, seq_len, rest, generator=gen)
    k[..., special:] = sigma * torch.randn(batch, kv_heads, seq_len, rest, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen)

    # Local band: q_i . k_j = c * sum_f cos(w_f (i - j)), c chosen so the sum at 0 is band_logit.
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.logspace(math.log10(0.25), math.log10(4.0), n_freq) * (math.pi / spec.band_width)
    angle = pos[:, None] * freqs
    rot = torch.cat([angle.cos(), angle.sin()], dim=-1)  # [N, 2F]
    band = (per_head(q_heads) * spec.band_logit * root / n_freq) ** 0.5
    q[..., : 2 * n_freq] = band[..., None] * rot
    k[..., : 2 * n_freq] = (spec.band_logit * root / n_freq) ** 0.5 * rot

    # Sink: one dim that only key 0 carries.
    q[..., 2 * n_freq] = per_head(q_heads) * spec.sink_logit * root / 8.0
    k[:, :, 0, 2 * n_freq] = 8.0

    # Heavy hitters: passages of 256 tokens, a share of whose keys (scattered inside the passage)
    # carry one topic each, with a heavy-tailed strength.
    n_seg = seq_len // 256
    n_pass = min(n_seg, round(spec.passage_scale * n_seg**spec.passage_exponent))
    t0 = 2 * n_freq + 1
    for b in range(batch):
        for h in range(kv_heads):
            seg = torch.randperm(n_seg, generator=gen)[:n_pass]
            inside = torch.rand(n_pass, 256, generator=gen) < spec.heavy_fraction
            where = (seg[:, None] * 256 + torch.arange(256))[inside]
            topic = torch.randint(spec.topics, (n_pass, 1), generator=gen).expand(n_pass, 256)[inside]
            passage = torch.exp(spec.passage_spread * torch.randn(n_pass, 1, generator=gen))
            strength = passage.expand(n_pass, 256)[inside] * (0.5 + torch.rand(where.numel(), generator=gen))
            k[b, h, where, t0 + topic] = 4.0 * strength
    # Each query's topic mixture drifts along the sequence (smooth random walk on the simplex).
    anchors = seq_len // spec.topic_drift + 2
    mix = torch.rand(batch, q_heads, anchors, spec.topics, generator=gen) ** 3
    mix = mix / mix.sum(-1, keepdim=True)
    mix = (
        torch.nn.functional.interpolate(
            mix.flatten(0, 1).transpose(1, 2), size=seq_len, mode="linear", align_corners=True
        )
        .transpose(1, 2)
        .unflatten(0, (batch, q_heads))
    )
    topic_q = per_head(q_heads)[..., None] * spec.heavy_logit * root / 4.0
    q[..., t0 : t0 + spec.topics] = topic_q * mix * spec.topics**0.5
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def real_qkv(
    path: str | Path, layer: int, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v of one layer captured by ``python -m bench quality run`` (``qkv_<text>_<N>.pt``, float16,
    ``{layer: (q, k, v)}``), cast to ``dtype`` on ``device``."""
    captured = torch.load(path, map_location="cpu")
    return tuple(x.to(device=device, dtype=dtype) for x in captured[layer])


def stress_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int = 0,
    magnitude: float = 1.0,
    outliers: int = 0,
    outlier_gain: float = 50.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, N, D]``, k and v ``[B, Hkv, N, D]`` made on ``device`` in ``dtype`` (no float32 copy of q).

    LLM-like: a sink at token 0, a local band, 2% heavy-hitter keys sharing a direction the queries look
    for; optional outlier channels (``outliers`` channels times ``outlier_gain``) and an overall
    ``magnitude`` on q/k/v, clamped to the dtype's range. Drawn from a generator on ``device``, so a seed
    gives the same inputs on the same kind of device only.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    group = q_heads // kv_heads
    topic = torch.randn(batch, kv_heads, 1, head_dim, generator=gen, device=device)
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None]
    freqs = torch.arange(1, head_dim // 2 + 1, device=device, dtype=torch.float32) / 64
    band = torch.cos(pos * freqs).repeat(1, 2)[:, :head_dim] * 0.6  # [N, D]: nearby tokens look alike
    channels = torch.arange(outliers, device=device) * 7 % head_dim
    finite = torch.finfo(dtype).max
    out = []
    for name, heads in (("q", q_heads), ("k", kv_heads), ("v", kv_heads)):
        x = torch.empty(batch, heads, seq_len, head_dim, device=device, dtype=dtype)
        for h in range(heads):  # one head at a time keeps float32 temporaries at [B, N, D]
            t = torch.randn(batch, seq_len, head_dim, generator=gen, device=device)
            kv = h // group if name == "q" else h
            if name == "q":
                t += 1.5 * topic[:, kv]
            if name == "k":
                heavy = torch.rand(batch, seq_len, 1, generator=gen, device=device) < 0.02
                t += 3.0 * heavy * topic[:, kv]
                t[:, 0] += 4.0 * topic[:, kv, 0]
            if name != "v":
                t += band
                t[..., channels] *= outlier_gain
            x[:, h] = (t * magnitude).clamp(-finite, finite).to(dtype)
        out.append(x)
    return out[0], out[1], out[2]


def prefix(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` tokens of ``x [B, H, L, D]``, repeating it when ``n > L``; a fresh contiguous tensor
    (one long draw gives every shorter length as a prefix of itself)."""
    reps = -(-n // x.shape[2])
    return (x.repeat(1, 1, reps, 1) if reps > 1 else x)[:, :, :n].contiguous()

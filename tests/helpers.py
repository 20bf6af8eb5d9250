"""Shared input generators and dense baselines for the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st


@dataclass(frozen=True)
class Case:
    batch: int
    kv_heads: int
    group: int
    seq_len: int
    head_dim: int
    block_size: int
    segment_size: int
    seed: int
    sharpness: float = 1.0

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group


def make_qkv(case: Case, dtype: torch.dtype = torch.float32, value_dim: int | None = None):
    """Random q/k/v; ``sharpness`` scales q so attention is peaked and selection non-trivial."""
    gen = torch.Generator().manual_seed(case.seed)
    shape_q = (case.batch, case.q_heads, case.seq_len, case.head_dim)
    shape_k = (case.batch, case.kv_heads, case.seq_len, case.head_dim)
    shape_v = (case.batch, case.kv_heads, case.seq_len, value_dim or case.head_dim)
    q = torch.randn(shape_q, generator=gen) * case.sharpness
    k = torch.randn(shape_k, generator=gen)
    v = torch.randn(shape_v, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa_causal(q, k, v, scale=None, valid_keys=None):
    """float32 dense causal attention with K/V repeated per query head.

    Queries are the last Nq of the N key positions (bottom-right causal mask); ``valid_keys [B, N]``
    also masks padded keys, and query rows left without any key are zeros.
    """
    group = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(group, dim=1) for x in (k, v))
    n_q, n = q.shape[2], k.shape[2]
    if n_q == n and valid_keys is None:
        return F.scaled_dot_product_attention(q.float(), k, v, is_causal=True, scale=scale)
    mask = torch.ones(n_q, n, dtype=torch.bool).tril(diagonal=n - n_q)
    if valid_keys is not None:
        mask = mask & valid_keys[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


@st.composite
def cases(draw, max_len: int = 1100, sharp: bool = False) -> Case:
    block = draw(st.sampled_from([64, 128]))
    segment = block * draw(st.sampled_from([1, 2, 4]))
    seq_len = draw(
        st.one_of(
            st.integers(1, max_len),
            st.sampled_from(
                [segment, segment + 1, 2 * segment - 1, 2 * segment, 2 * segment + block + 1]
            ).filter(lambda n: n <= max_len),
        )
    )
    return Case(
        batch=draw(st.sampled_from([1, 2])),
        kv_heads=draw(st.sampled_from([1, 2, 4])),
        group=draw(st.sampled_from([1, 2, 4])),
        seq_len=seq_len,
        head_dim=draw(st.sampled_from([16, 32, 64, 128])),
        block_size=block,
        segment_size=segment,
        seed=draw(st.integers(0, 2**31 - 1)),
        sharpness=draw(st.sampled_from([1.0, 2.0, 4.0])) if sharp else 1.0,
    )


@st.composite
def chunk_cases(draw, max_len: int = 1100, sharp: bool = False) -> tuple[Case, int]:
    """A case whose ``seq_len`` is the key length N, and a query length 1 <= Nq <= N, often a chunk
    that starts on a block boundary or just after one."""
    case = draw(cases(max_len=max_len, sharp=sharp).filter(lambda c: c.seq_len >= 1))
    n, block = case.seq_len, case.block_size
    aligned = [n - s for s in range(0, n, block)]
    n_queries = draw(
        st.one_of(
            st.integers(1, n),
            st.sampled_from(aligned),
            st.sampled_from([max(1, a - 1) for a in aligned] + [min(n, a + 1) for a in aligned]),
        )
    )
    return case, n_queries


def pooled_block_probs(
    q: torch.Tensor, k_p: torch.Tensor, candidates: torch.Tensor, block_size: int, scale: float
):
    """``[B, Hq, nbq, nb]`` float32: softmax over the candidate key blocks of the mean-pooled logits
    (prefill), 0 off the candidates and on rows without any; written plainly, for the selection tests."""

    def pool(x):
        n = x.shape[2]
        blocks = torch.nn.functional.pad(x.float(), (0, 0, 0, -n % block_size)).unflatten(2, (-1, block_size))
        counts = torch.full((blocks.shape[2], 1), float(block_size))
        counts[-1] = n - (blocks.shape[2] - 1) * block_size
        return blocks.sum(3) / counts

    group = q.shape[1] // k_p.shape[1]
    logits = pool(q) @ pool(k_p).repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    probs = logits.masked_fill(~candidates, float("-inf")).softmax(-1)
    return probs.nan_to_num(0.0)

"""Bytes a packed batch moves outside the PBS stages (bench/traffic.py on the meta device)."""

from __future__ import annotations

from bench.traffic import batch_traffic, per_stage


def test_varlen_builds_its_frame_without_copying_it():
    # Two sequences in a frame of 2 x 2048 slots, one KV-head chunk (no head-chunk copies at this size).
    lengths, heads, kv_heads, head_dim = [512, 2048], 8, 2, 128
    traffic = batch_traffic(lengths, heads, kv_heads, head_dim)
    bf16 = 2
    tokens, slots = sum(lengths), len(lengths) * max(lengths)
    packed = tokens * (heads + 2 * kv_heads) * head_dim * bf16  # q, k and v as given
    padding = (slots - tokens) * (heads + 2 * kv_heads) * head_dim * bf16  # the frames' other slots
    out = tokens * heads * head_dim * bf16
    # zero the padding, place the tokens (read + write), pick the output rows into the output (read +
    # write)
    expected = padding + 2 * packed + 2 * out
    outside = per_stage(traffic["varlen"])["outside"] * 1e9
    # zeroing whole frames would add (slots - padding) x 16 bytes per head dim, a transposing copy of the
    # frames 2 x frame, joining head chunks' outputs 2 x out
    assert expected <= outside <= 1.1 * expected
    assert per_stage(traffic["singles"]).get("outside", 0.0) < 0.01 * expected

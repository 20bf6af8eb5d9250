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
    frame = slots * (heads + 2 * kv_heads) * head_dim * bf16  # their frames
    out = tokens * heads * head_dim * bf16
    # write every frame slot once (tokens or zeros), read each token once, pick the output rows into
    # the output (read + write)
    expected = frame + packed + 2 * out
    outside = per_stage(traffic["varlen"])["outside"] * 1e9
    # zeroing the frames first would add a frame, a transposing copy of the frames 2 x frame, joining
    # head chunks' outputs 2 x out
    assert expected <= outside <= 1.1 * expected
    assert per_stage(traffic["singles"]).get("outside", 0.0) < 0.01 * expected

"""Packed batches on the GPU: per-sequence results, and a call captured in a CUDA graph."""

import warnings

import pytest
import torch

import flexpbs
from flexpbs.limits import override
from tests.test_varlen import HKV, HQ, packed_batch, unpack

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device")

LENGTHS = [(4096, 4096), (1000, 6000), (300, 300), (2500, 5000)]
OPTIONS = dict(threshold=0.8, min_seq_len=0, backend="triton")


def cuda_batch(dtype=torch.bfloat16, lengths=LENGTHS):
    q, k, v, cu_q, cu_k, sequences = packed_batch(lengths, seed=11, dtype=dtype)
    return (*(x.cuda() for x in (q, k, v, cu_q, cu_k)), [tuple(x.cuda() for x in s) for s in sequences])


@pytest.mark.parametrize("frames", [{}, dict(frame_short_keys=0)])  # one frame; frames by length
def test_each_sequence_equals_a_call_on_it_alone_on_cuda(frames):
    q, k, v, cu_q, cu_k, sequences = cuda_batch()
    with override(**frames):
        out, stats = flexpbs.varlen_attention(q, k, v, cu_q, cu_k, return_stats=True, **OPTIONS)
    assert out.shape == (q.shape[0], HQ, v.shape[-1]) and k.shape[1] == HKV
    for b, (q_b, k_b, v_b) in enumerate(sequences):
        alone, alone_stats = flexpbs.attention(q_b, k_b, v_b, return_stats=True, **OPTIONS)
        assert stats[b].dense == alone_stats.dense
        if torch.equal(stats[b].key_positions, alone_stats.key_positions):
            assert torch.equal(stats[b].tiles, alone_stats.tiles)
        torch.testing.assert_close(unpack(out, cu_q, b).float(), alone.float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("lengths", [LENGTHS, [(2500, 5000)]])  # one frame; one sequence, no frame
def test_a_call_with_given_maxima_is_captured_in_a_cuda_graph(lengths):
    q, k, v, cu_q, cu_k, _ = cuda_batch(lengths=lengths)
    maxima = dict(max_seqlen_q=max(n_q for n_q, _ in lengths), max_seqlen_k=max(n for _, n in lengths))
    call = lambda: flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **maxima, **OPTIONS)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiles and fills the caches before capture
        eager = call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


def _synchronizations(call) -> int:
    """Host synchronisations that ``call`` makes (``torch.cuda.set_sync_debug_mode`` warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_frames_by_length_synchronise_no_more_than_one_frame():
    # reading the offsets synchronises once per call; the frames' rows and offsets are made on the
    # device (a blocking copy per frame made the GPU wait for the host to queue each frame's pipeline)
    q, k, v, cu_q, cu_k, _ = cuda_batch()
    call = lambda: flexpbs.varlen_attention(q, k, v, cu_q, cu_k, **OPTIONS)  # noqa: E731
    call()  # compiles
    with override(frame_share=0.0):  # one frame
        one_frame = _synchronizations(call)
    with override(frame_short_keys=0):  # three frames: 6000 and 5000 keys, 4096, 300
        by_length = _synchronizations(call)
    assert one_frame >= 1 and by_length <= one_frame, (one_frame, by_length)

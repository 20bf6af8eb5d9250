"""flexpbs.integrations.transformers: a tiny random Llama (GQA) with attn_implementation="flexpbs"."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flexpbs.nn  # noqa: E402
import flexpbs.pipeline  # noqa: E402
from flexpbs import PBSConfig  # noqa: E402
from flexpbs.integrations import transformers as fx  # noqa: E402

PROMPT_LEN = 600
# The cache keyword of a model's forward: ``cache`` in newer transformers (which deprecate
# ``past_key_values``), ``past_key_values`` in older ones.
CACHE = (
    "cache"
    if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    else "past_key_values"
)
OPTIONS = dict(block_size=64, segment_size=128, threshold=1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pbs():
    return fx.register(**OPTIONS)


@pytest.fixture
def use(model, pbs):
    """use(name, **pbs_overrides): switch the model's attention; flexpbs overrides go through
    model.config.flexpbs. Restores sdpa and clears the counters afterwards."""

    def switch(name, **overrides):
        model.set_attn_implementation(name)
        model.config.flexpbs = overrides or None
        pbs.reset()
        return model

    yield switch
    model.config.flexpbs = None
    model.set_attn_implementation("sdpa")
    pbs.reset()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 1000, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def test_threshold_one_equals_sdpa(use, pbs, prompt):
    want = logits(use("sdpa"), prompt)
    got = logits(use("flexpbs"), prompt)
    assert pbs.calls == {"pbs": 2}  # both layers ran PBS
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_generate_gives_the_same_tokens(use, pbs, prompt):
    kwargs = dict(max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(prompt))
    want = use("sdpa").generate(prompt, **kwargs)
    got = use("flexpbs").generate(prompt, **kwargs)
    assert torch.equal(got, want)
    assert pbs.calls == {"pbs": 2, "not_prefill": 4}  # prefill by PBS, 2 decoding steps by sdpa


def test_threshold_from_model_config_and_stats(use, pbs, prompt):
    seen = []
    pbs.on_stats = lambda layer, stats: seen.append((layer, stats.density.mean().item()))
    try:
        model = use("flexpbs", threshold=0.5)
        assert pbs.config_for(model.model.layers[0].self_attn).threshold == 0.5
        out = logits(model, prompt)
    finally:
        pbs.on_stats = None
    assert torch.isfinite(out).all()
    assert [layer for layer, _ in seen] == [0, 1]
    assert pbs.last_stats is not None and not pbs.last_stats.dense
    assert pbs.last_stats.density.shape == (1, 4)  # [B, Hq]
    assert all(0.0 < density < 1.0 for _, density in seen)  # sparser than causal
    assert pbs.last_stats.key_positions.shape == (1, 2, PROMPT_LEN)  # one permutation per KV head


def test_padded_batch_runs_pbs(use, pbs, prompt):
    ids = prompt.repeat(3, 1)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding in the second row
    mask[2, 450:] = 0  # right padding in the third
    want = logits(use("sdpa"), ids, attention_mask=mask)
    got = logits(use("flexpbs"), ids, attention_mask=mask)
    assert pbs.calls == {"pbs": 2}
    assert isinstance(pbs.last_stats, list) and len(pbs.last_stats) == 3  # one PBSStats per sequence
    assert pbs.last_stats[1].key_positions.shape == (1, 2, PROMPT_LEN - 37)
    real = mask.bool()  # padded positions differ (zeros vs SDPA's values), and no real token reads them
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


def test_batched_generate_with_left_padding(use, pbs, prompt):
    ids = prompt.repeat(2, 1)
    ids[1, :100] = 0
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # a 500-token prompt, left-padded to 600
    kwargs = dict(max_new_tokens=3, do_sample=False, attention_mask=mask, pad_token_id=0)
    want = use("sdpa").generate(ids, **kwargs)
    got = use("flexpbs").generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert pbs.calls == {"pbs": 2, "not_prefill": 4}  # padded prefill by PBS, decoding by sdpa


def chunked_prefill(model, ids, chunks):
    cache = transformers.DynamicCache(config=model.config)
    out, start = [], 0
    with torch.no_grad():
        for length in chunks:
            out.append(model(ids[:, start : start + length], use_cache=True, **{CACHE: cache}).logits)
            start += length
    return torch.cat(out, dim=1)


def test_chunked_prefill_with_a_cache_runs_pbs(use, pbs, prompt):
    chunks = [256, 344]  # the second chunk: 344 queries over 600 keys
    want = chunked_prefill(use("sdpa"), prompt, chunks)
    got = chunked_prefill(use("flexpbs"), prompt, chunks)
    assert pbs.calls == {"pbs": 4}
    assert pbs.last_stats.tiles.shape == (1, 4, 6, 10)  # (query blocks, key blocks) of 600 keys
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, logits(use("sdpa"), prompt), rtol=0, atol=1e-5)


def test_short_chunks_and_static_cache_fall_back_to_sdpa(use, pbs, prompt):
    chunks = [500, 100]  # a chunk of at most segment_size queries goes to SDPA
    want = chunked_prefill(use("sdpa"), prompt, chunks)
    got = chunked_prefill(use("flexpbs"), prompt, chunks)
    assert pbs.calls == {"pbs": 2, "not_prefill": 2}
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # A static cache has more key slots than tokens and no mask: transformers means SDPA's top-left
    # causal mask there, not a chunk at the last key positions.
    def static(model):
        cache = transformers.StaticCache(config=model.config, max_cache_len=PROMPT_LEN + 100)
        return logits(model, prompt, use_cache=True, **{CACHE: cache})

    want = static(use("sdpa"))
    got = static(use("flexpbs"))
    assert "pbs" not in pbs.calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_causal_and_padding_masks_are_recognised():
    gen = torch.Generator().manual_seed(0)
    valid = torch.rand(3, 50, generator=gen) < 0.8
    valid[:, -1] = True
    for q_len in (50, 20, 1):
        causal = torch.ones(q_len, 50, dtype=torch.bool).tril(50 - q_len)
        mask = (causal & valid[:, None, :])[:, None]
        assert torch.equal(fx._key_padding(mask, 3, q_len, 50), valid)
        assert torch.equal(fx._key_padding(mask[:1], 3, q_len, 50), valid[:1].expand(3, 50))
        top_left = torch.ones(q_len, 50, dtype=torch.bool).tril()
        window = causal & ~torch.ones(q_len, 50, dtype=torch.bool).tril(50 - q_len - 8)
        assert fx._key_padding(mask.float(), 3, q_len, 50) is None
        if q_len == 1:
            continue  # one row is always some padding mask (decoding never gets here: "not_prefill")
        others = (window,) if q_len == 50 else (window, top_left)  # top-left = bottom-right for Nq == N
        for other in others:
            assert fx._key_padding(other.expand(3, 1, q_len, 50), 3, q_len, 50) is None
    assert fx._key_padding(mask, 3, q_len, 51) is None  # shape mismatch


def test_short_prompt_and_grad_fall_back_to_sdpa(use, pbs, prompt):
    short = prompt[:, :100]
    want = logits(use("sdpa"), short)
    got = logits(use("flexpbs"), short)
    assert pbs.calls == {"short": 2}
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    model = use("flexpbs")
    got = model(prompt).logits  # autograd on: PBS is inference-only
    assert pbs.calls == {"grad": 2}
    torch.testing.assert_close(got.detach(), logits(use("sdpa"), prompt), rtol=0, atol=0)


def test_register_validates_and_from_config_accepts_the_name(pbs, model):
    with pytest.raises(ValueError, match="not both"):
        fx.register(config=PBSConfig(), threshold=0.5)
    with pytest.raises(TypeError, match="name"):
        fx.register(name="")
    other = transformers.AutoModelForCausalLM.from_config(model.config, attn_implementation="flexpbs")
    assert other.config._attn_implementation == "flexpbs"


def test_compiled_prefill_fullgraph_runs_pbs(use, pbs, prompt, monkeypatch):
    calls = []
    eager_pipeline = flexpbs.pipeline.pbs_attention

    def counting_pipeline(query, key, value, cfg, return_stats):  # what flexpbs::attention runs
        calls.append(cfg.threshold)
        return eager_pipeline(query, key, value, cfg, return_stats)

    monkeypatch.setattr(flexpbs.api, "pbs_attention", counting_pipeline)
    model = use("flexpbs", threshold=0.9)
    compiled = torch.compile(model, fullgraph=True)
    got = logits(compiled, prompt)  # a DynamicCache, as in generate(): no packed-sequence mask
    assert calls == [0.9, 0.9]  # both layers ran PBS inside the compiled graph
    torch.testing.assert_close(got, logits(model, prompt), rtol=0, atol=1e-4)

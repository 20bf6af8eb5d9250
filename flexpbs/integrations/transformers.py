"""PBS prefill attention for Hugging Face transformers models (transformers >= 4.56).

    import flexpbs.integrations.transformers as fx
    pbs = fx.register(block_size=128, segment_size=256, threshold=0.9)   # adds "flexpbs"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flexpbs")
    # or: model.set_attn_implementation("flexpbs")

The registered function runs :func:`flexpbs.attention` for causal prefill with K/V at their Hkv
heads (GQA without ``repeat_kv``): a whole prompt, or a chunk of a prompt against a cache (more
query tokens than ``segment_size``, the queries at the last key positions), without a mask or with
a mask that is exactly the bottom-right causal mask AND a key padding mask (left or right padding,
passed to flexpbs as ``valid_keys``); ``module.is_causal``, no dropout, no autograd, more keys than
one segment. Every other call (decoding steps and chunks of at most ``segment_size`` tokens, other
masks, short prompts, dropout in training, gradients, non-causal modules, a ``position_bias`` or
paged cache, and any masked call inside torch.compile) goes to transformers' own
``sdpa_attention_forward`` with the same arguments, so it computes exactly what
``attn_implementation="sdpa"`` computes. Masks are built as for "sdpa" (``sdpa_mask``), except that
a plain causal mask with equal query and key lengths and no padding is always skipped (None), also
under torch.compile, where transformers materialises it with torch < 2.14. A materialised mask is
checked against ``causal & padding`` in full (a read of the mask and a device sync, eager only); a
padded batch then gives what each sequence alone gives on its real tokens, and query rows at padded
positions are zeros (SDPA leaves other values there, which no real token reads). ``last_stats`` and
``on_stats`` get a list of per-sequence PBSStats for a padded batch (see :func:`flexpbs.attention`).

Options: ``register(config=...)`` or ``register(**options)`` give the defaults; a model whose config
has a ``flexpbs`` dict (``model.config.flexpbs = {"threshold": 0.95}``) overrides them key by key.
The softmax scale is the model's ``scaling`` (as for SDPA) when the model passes one.

What ran is observable in eager mode (nothing is recorded inside torch.compile): the returned
:class:`FlexPBSAttention` counts calls per path in ``calls`` (``"pbs"`` or a fallback reason, see
:data:`FALLBACK_REASONS`), keeps the last PBS call's :class:`~flexpbs.PBSStats` in ``last_stats``
and calls ``on_stats(layer_idx, stats)`` after every PBS call.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from flexpbs.api import attention
from flexpbs.config import PBSConfig, PBSStats
from flexpbs.dispatch import resolve
from flexpbs.limits import LIMITS
from flexpbs.rows import copy_tensor_rows

FALLBACK_REASONS: dict[str, str] = {
    "not_prefill": (
        "query length < key length with at most segment_size queries (decoding, short chunks), or "
        "without a mask (transformers then means SDPA's top-left causal mask: static cache slots)"
    ),
    "mask": "a mask other than bottom-right causal with key padding (or any mask inside torch.compile)",
    "not_causal": "the module or the call is not causal",
    "dropout": "attention dropout > 0 (training)",
    "grad": "inputs require grad with autograd enabled (PBS is inference-only)",
    "short": "at most segment_size tokens, or fewer than min_seq_len (by default the length from which PBS "
    "beats dense attention on this GPU)",
    "unsupported": "position_bias, a paged cache, or more queries than keys",
}


class FlexPBSAttention:
    """The attention function :func:`register` adds; callable with transformers' signature.

    Attributes:
        name: the ``attn_implementation`` name it is registered under.
        config: the registration's :class:`PBSConfig` (defaults for every model).
        calls: ``collections.Counter`` of eager calls per path: ``"pbs"`` or a key of
            :data:`FALLBACK_REASONS`.
        backends: ``collections.Counter`` of eager PBS calls per FlexAttention backend that ran
            (``"triton"`` or ``"flash"``, see ``backend="auto"``).
        last_stats: :class:`PBSStats` of the last eager PBS call (any layer), a list of them
            (one per sequence) for a padded batch, or None.
        on_stats: ``callable(layer_idx, stats)`` called after every eager PBS call, or None.
    """

    def __init__(
        self,
        name: str,
        config: PBSConfig,
        on_stats: Callable[[int | None, PBSStats | list[PBSStats]], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.on_stats = on_stats
        self.calls: collections.Counter[str] = collections.Counter()
        self.backends: collections.Counter[str] = collections.Counter()
        self.last_stats: PBSStats | list[PBSStats] | None = None

    def reset(self) -> None:
        """Clear ``calls``, ``backends`` and ``last_stats``."""
        self.calls.clear()
        self.backends.clear()
        self.last_stats = None

    def config_for(self, module: torch.nn.Module, scaling: float | None = None) -> PBSConfig:
        """The options used for ``module``: registration config, then the model config's
        ``flexpbs`` dict, then the model's ``scaling``."""
        overrides = getattr(getattr(module, "config", None), "flexpbs", None) or {}
        if not isinstance(overrides, dict):
            raise TypeError(
                f"model config.flexpbs must be a dict of PBSConfig options, got {type(overrides).__name__}"
            )
        if scaling is not None:
            overrides = {**overrides, "scale": float(scaling)}
        # replace, not asdict: asdict deep-copies, which torch 2.11's dynamo cannot trace
        return dataclasses.replace(self.config, **overrides) if overrides else self.config

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """``query [B, Hq, Nq, D]``, ``key``/``value [B, Hkv, Nk, D]`` -> (``[B, Nq, Hq, Dv]``, None)."""
        config = self.config_for(module, scaling)
        compiling = torch.compiler.is_compiling()
        # "auto" options are resolved per call on the real device; while compiling, the custom op
        # resolves them behind the graph, and only inputs of at most one segment fall back here.
        decided = dataclasses.replace(config, min_seq_len=0) if compiling else resolve(config, query, value)
        reason = _fallback_reason(module, query, key, value, attention_mask, dropout, decided, kwargs)
        valid_keys = None
        if reason is None and attention_mask is not None:
            if not compiling:  # recognising the mask reads it: eager only
                valid_keys = _key_padding(attention_mask, query.shape[0], query.shape[2], key.shape[2])
            if valid_keys is None:
                reason = "mask"
            elif bool(valid_keys.all()):
                valid_keys = None  # causal without padding (a chunk against a cache): one batched call
        if reason is not None:
            if not compiling:
                self.calls[reason] += 1
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            return out, None
        if compiling:
            out = attention(query, key, value, config=config)
        else:
            out, stats = attention(
                query, key, value, valid_keys=valid_keys, config=decided, return_stats=True
            )
            self.calls["pbs"] += 1
            self.backends[decided.backend] += 1
            self.last_stats = stats
            if self.on_stats is not None:
                self.on_stats(getattr(module, "layer_idx", None), stats)
        if compiling or out.transpose(1, 2).is_contiguous():  # dense SDPA's output already is
            return out.transpose(1, 2).contiguous(), None
        result = out.new_empty(out.shape[0], out.shape[2], out.shape[1], out.shape[3])
        copy_tensor_rows(out, result.transpose(1, 2))
        return result, None


def _fallback_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    config: PBSConfig,
    kwargs: dict,
) -> str | None:
    """Why this call cannot run PBS (a key of FALLBACK_REASONS), or None when it may (a mask
    is then still to be recognised by :func:`_key_padding`)."""
    q_len, n_keys = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None or q_len > n_keys:
        return "unsupported"
    if q_len < n_keys and (config.runs_dense(q_len) or attention_mask is None):
        return "not_prefill"
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        return "mask"
    if not is_causal:
        return "not_causal"
    if dropout > 0.0:
        return "dropout"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "grad"
    if config.runs_dense(n_keys):
        return "short"
    return None


def _key_padding(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> torch.Tensor | None:
    """``valid_keys [B, N]`` when ``mask`` is exactly the bottom-right causal mask AND a key
    padding mask, else None.

    Args:
        mask: transformers' boolean ``[B or 1, 1, Nq, N]`` mask (True = attend).

    The last query sits at the last key position, so its row is the padding mask itself; the
    whole mask is then compared with ``causal & padding`` in row chunks of bounded memory (one
    read of the mask, and a device sync).
    """
    if (
        mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[0] not in (1, batch)
        or mask.shape[1] != 1
        or mask.shape[2:] != (q_len, kv_len)
    ):
        return None
    mask = mask[:, 0]
    valid = mask[:, -1]
    key_pos = torch.arange(kv_len, device=mask.device)
    step = max(1, LIMITS.mask_check_elements // max(1, mask.shape[0] * kv_len))
    for r0 in range(0, q_len, step):
        q_pos = torch.arange(r0, min(r0 + step, q_len), device=mask.device) + (kv_len - q_len)
        want = (key_pos[None, :] <= q_pos[:, None]) & valid[:, None, :]
        if not torch.equal(mask[:, r0 : r0 + step], want):
            return None
    return valid.expand(batch, kv_len)


def _causal_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, but None for a plain causal mask of equal query and key
    lengths without padding, decided on shapes and arguments only (no data, no graph break)."""
    q_length = kwargs.get("q_length")
    if q_length is None and kwargs.get("cache_position") is not None:  # transformers < 5
        q_length = kwargs["cache_position"].shape[0]
    plain_causal = (
        not args
        and kwargs.get("attention_mask") is None
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("allow_is_causal_skip", True)
        and kwargs.get("kv_offset", 0) == 0
        and q_length is not None
        and q_length == kwargs.get("kv_length")
    )
    return None if plain_causal else sdpa_mask(*args, **kwargs)


def register(
    name: str = "flexpbs",
    config: PBSConfig | None = None,
    *,
    on_stats: Callable[[int | None, PBSStats | list[PBSStats]], None] | None = None,
    **options,
) -> FlexPBSAttention:
    """Register PBS prefill attention with transformers under ``name``.

    Args:
        name: the ``attn_implementation`` name (``from_pretrained(..., attn_implementation=name)``
            or ``model.set_attn_implementation(name)``).
        config: a :class:`PBSConfig`; or pass its fields as ``options``, not both.
        on_stats: optional ``callable(layer_idx, stats)`` after every eager PBS call.
        **options: :class:`PBSConfig` fields.

    Returns:
        The registered :class:`FlexPBSAttention` (call counters, last stats).

    Raises:
        TypeError: ``name`` is not a str, ``config`` not a PBSConfig, or an option has a wrong type.
        ValueError: an option is out of range, or ``config`` and ``options`` are both given.

    Registering a name again replaces the function. The mask function of ``name`` is ``sdpa_mask``
    (with plain causal masks skipped also under torch.compile).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    fn = FlexPBSAttention(name, PBSConfig.resolve(config, options), on_stats)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _causal_mask)
    return fn

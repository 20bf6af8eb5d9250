"""``PBSAttention``: :func:`flexpbs.attention` as an ``nn.Module``, usable eagerly and under torch.compile.

Under ``torch.compile`` :func:`flexpbs.attention` is the opaque custom op ``flexpbs::attention``, so
the user's graph stays shape-generic; behind the op the pipeline runs as in eager mode, FlexAttention
compiled with static shapes once per length bucket (8 per doubling). Inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from flexpbs.api import attention
from flexpbs.config import PBSConfig


class PBSAttention(nn.Module):
    """Causal prefill attention with Permuted Block-Sparse selection, as a module.

    Args:
        config: a :class:`PBSConfig`; ``None`` builds one from ``options``.
        **options: :class:`PBSConfig` fields (``block_size``, ``segment_size``, ``threshold``,
            ``gqa``, ``scale``, ``min_seq_len``, ``importance_kernel``, ``key_order``, ``max_shrink``,
            ``exact_last_block``, ``backend``); not together with ``config``.

    ``forward(query [B, Hq, Nq, D], key [B, Hkv, N, D], value [B, Hkv, N, Dv], valid_keys=None)
    -> [B, Hq, Nq, Dv]`` equals ``flexpbs.attention(query, key, value, valid_keys=valid_keys,
    config=self.config)`` (Nq < N: a chunk at the last key positions; ``valid_keys [B, N]``: key
    padding). The module has no parameters or buffers.

    Raises:
        TypeError, ValueError: as :class:`PBSConfig` for bad options; ``config`` together with
            options raises ValueError.
    """

    def __init__(self, config: PBSConfig | None = None, **options) -> None:
        super().__init__()
        self.config = PBSConfig.resolve(config, options)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        valid_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return attention(query, key, value, valid_keys=valid_keys, config=self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"block_size={c.block_size}, segment_size={c.segment_size}, threshold={c.threshold}, "
            f"gqa={c.gqa!r}"
        )

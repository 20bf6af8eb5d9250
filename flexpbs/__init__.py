"""flexpbs: Permuted Block-Sparse attention (PBS-Attn) on PyTorch FlexAttention.

Public API: :func:`attention`, :func:`varlen_attention` (packed batches), :func:`warmup`,
:class:`PBSConfig`, :class:`PBSStats`, :mod:`flexpbs.nn` (``PBSAttention``) and :mod:`flexpbs.limits`
(memory budgets). The dense float32 oracle the tests compare against is :mod:`flexpbs.reference`.

Shapes and words, the same in every module:

- ``B`` batch; ``Hq`` query heads; ``Hkv`` key/value heads (Hq a multiple of Hkv, ``G = Hq / Hkv``);
  ``Hp`` permutation rows: Hkv for ``gqa="shared"`` or ``key_order="original"``, Hq for ``"per_head"``.
- ``N`` (``n_keys``) the key length; ``Nq`` (``n_queries``) the query length, the queries sitting at
  the last Nq key positions (Nq = N for a whole prompt, Nq < N for a chunk against a cache).
- ``nb = ceil(N / block_size)`` key blocks; ``nbq`` query blocks, aligned to key blocks (a chunk's
  first query block is key block ``(N - Nq) // block_size``).
- tile: one (query block, key block) pair; ``tiles``: the ``[B, Hq, nbq, nb]`` bool table of the tiles
  computed, over permuted key blocks. FlexAttention's ``BlockMask`` is built from them, not the same.
- segment: ``segment_size`` keys inside which keys are sorted by importance; ``key_positions``: the
  original position of the key at each permuted slot.
- importance: how much the last query block attends to each key (it orders the keys); estimator: how a
  tile is scored for selection (``"mean_pool"`` or ``"antidiagonal"``); stride ``S``: the antidiagonal
  estimator's group of S queries and S keys per strided entry.
"""

from flexpbs import limits, nn
from flexpbs.api import attention
from flexpbs.config import PBSConfig, PBSStats
from flexpbs.varlen import varlen_attention
from flexpbs.warmup import warmup

__all__ = ["attention", "varlen_attention", "warmup", "PBSConfig", "PBSStats", "nn", "limits"]
__version__ = "0.1.0"

"""flexpbs: Permuted Block-Sparse attention (PBS-Attn) on PyTorch FlexAttention.

Public API: :func:`attention`, :func:`warmup`, :class:`PBSConfig`, :class:`PBSStats` and :mod:`flexpbs.nn`
(``flexpbs.nn.PBSAttention``). The dense float32 oracle
used by the tests lives in :mod:`flexpbs.reference`.
"""

from flexpbs import limits, nn
from flexpbs.api import attention
from flexpbs.config import PBSConfig, PBSStats
from flexpbs.warmup import warmup

__all__ = ["attention", "warmup", "PBSConfig", "PBSStats", "nn", "limits"]
__version__ = "0.1.0"

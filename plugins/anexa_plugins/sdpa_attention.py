"""Attention plugin ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (the default).

The same function the ``triton`` plugin falls back to, so the two can never disagree on masking.
"""

from dataclasses import dataclass
from typing import ClassVar

from anexa_core import hookimpl
from anexa_kernels import sdpa_attention


@dataclass
class SDPA:
    """``F.scaled_dot_product_attention`` with a bottom-right causal mask; PyTorch picks the backend.
    Grouped-query heads go to SDPA as they are (``enable_gqa``); per-row ``lengths`` become a mask."""

    grouped_query: ClassVar[bool] = True
    ragged: ClassVar[bool] = True

    def __call__(self, q, k, v, *, causal, lengths=None):
        return sdpa_attention(q, k, v, causal=causal, lengths=lengths)


@hookimpl
def register_attention(register):
    register("sdpa", SDPA)

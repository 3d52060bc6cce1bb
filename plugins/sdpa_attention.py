"""Attention plugin ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (the default).

The same function the ``triton`` plugin falls back to, so the two can never disagree on masking.
"""

from anexa_kernels import sdpa_attention

from anexa_core import hookimpl


@hookimpl
def register_attention(register):
    register("sdpa", sdpa_attention)

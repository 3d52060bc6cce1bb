"""Attention plugin ``triton``: the FlashAttention-2 Triton kernels, else SDPA (logged once)."""

from dataclasses import dataclass
from typing import ClassVar

from anexa_core import AnexaError, hookimpl
from anexa_kernels import SUPPORTED_HEAD_DIMS, attention, fallback_reason


@dataclass
class TritonAttention:
    """The fused kernel in ``kernels/``; ``fallback_reason`` lets `anexa bench` label fallback rows honestly.

    Grouped-query heads (k/v with fewer heads than q) and per-row ``lengths`` go to the kernel as they
    are: no repeated heads, no per-row loop."""

    fallback_backend = "sdpa"
    grouped_query: ClassVar[bool] = True
    ragged: ClassVar[bool] = True

    def __call__(self, q, k, v, *, causal, lengths=None):
        # The kernel's head-dim limit is a model-config choice, so it is reported as a user mistake.
        head_dim = q.size(-1)
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise AnexaError(
                f"attention 'triton' supports head_dim (n_embd / n_head) in {SUPPORTED_HEAD_DIMS}, the model "
                f"has head_dim {head_dim}: change n_embd or n_head, or use attention 'sdpa'"
            )
        return attention(q, k, v, causal=causal, lengths=lengths)

    def fallback_reason(self, q):
        return fallback_reason(q)


@hookimpl
def register_attention(register):
    register("triton", TritonAttention)

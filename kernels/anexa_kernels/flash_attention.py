"""FlashAttention-2 in Triton: launchers, the autograd Function, and a dispatcher with a PyTorch fallback.

Reading order: the ``@triton.jit`` kernels in :mod:`flash_attention_kernels`, then the launchers here
that compute the grids, then :class:`FlashAttention` tying forward to backward.

Shapes: ``q`` (B, H, Tq, D); ``k``, ``v`` (B, Hkv, Tk, D) with ``H`` a multiple of ``Hkv``: grouped-query
attention (GQA, Ainslie et al. 2023), query head ``h`` reads key/value head ``h // (H / Hkv)``
(multi-query when ``Hkv`` = 1). Optional ``lengths`` (B,) int64 makes the rows ragged: row ``b`` has
``lengths[b]`` valid keys (``Tq <= lengths[b] <= Tk``; the rest is padding, never read) and its queries
are its last ``Tq`` valid positions (see :func:`sdpa_attention`, the reference semantics).

Cost, per (batch, head) with ``Tq`` queries, ``Tk`` keys and head dim ``D``:

* FLOPs. Forward: two matmuls, ``S = QKᵀ`` and ``O = PV``, ``4·Tq·Tk·D``; causal skips the blocks above
  the diagonal, about half of that when ``Tq == Tk``. Backward, as conventionally counted: five matmuls
  (recompute ``S``, ``dP = dO·Vᵀ``, ``dV = Pᵀ·dO``, ``dK = dSᵀ·Q``, ``dQ = dS·K``), ``2.5×`` the
  forward. Executed here: ``3.5×``, since the dK/dV and the dQ kernels each recompute S and dP rather
  than exchanging dQ through atomics.
* Memory traffic (HBM, ``e`` bytes per element). Forward: read Q once and write O once
  (``2·Tq·D·e``), read K and V once per query tile (``2·Tk·D·e·⌈Tq/BLOCK_M⌉``, mostly from L2),
  write the fp32 lse (``4·Tq``). The ``Tq×Tk`` score matrix never leaves the chip, so the extra memory is
  ``O(Tq)`` (the lse) and arithmetic intensity is about ``BLOCK_M`` FLOPs per byte of K/V read.
  Backward: the delta pre-pass reads O and dO; dK/dV reads K, V once and Q, dO, lse, delta once per key
  tile; dQ reads Q, dO once and K, V once per query tile; dQ, dK, dV are written once each.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from . import flash_attention_kernels as _kernels

    TRITON_IMPORT_ERROR: str | None = None
except ImportError as exc:  # triton is an optional dependency
    _kernels = None  # type: ignore[assignment]
    TRITON_IMPORT_ERROR = f"triton is not importable ({exc})"

logger = logging.getLogger("anexa_kernels")

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension, which carries batch × heads


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bucket(n: int) -> int:
    """The power of two at or above ``n``: the autotuner's key for a length."""
    return 1 << max(n - 1, 0).bit_length()


def _dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies fp32 inputs: plain TF32 only if torch was told it is fine
    (``torch.set_float32_matmul_precision("high")``); otherwise tf32x3, three TF32 tensor-core products
    that recover about fp32 accuracy (relative error ~1e-6) where plain fp32 FMAs spill registers and
    run far slower. fp16/bf16 operands ignore this."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _launch_context(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many query heads share one key/value head (1 without grouped-query attention)."""
    return q.shape[1] // k.shape[1] if k.shape[1] else 1


def _forward(q, k, v, causal: bool, sm_scale: float, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: the output (same layout as ``q``) and the fp32 base-2 row log-sum-exp."""
    batch, heads, t_q, head_dim = q.shape
    t_k = k.shape[2]
    # empty_like keeps q's layout: for q split out of a (B, T, H, D) projection, merging heads is free.
    out = torch.empty_like(q)
    lse = torch.empty((batch * heads, t_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    grid = lambda meta: (_cdiv(t_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    with _launch_context(q):
        _kernels._attention_forward[grid](
            q,
            k,
            v,
            out,
            lse,
            lse if lengths is None else lengths,  # unread without lengths (RAGGED=False)
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(out),
            heads,
            _group(q, k),
            t_q,
            t_k,
            sm_scale * math.log2(math.e),
            _bucket(t_q),
            _bucket(t_k),
            HEAD_DIM=head_dim,
            CAUSAL=causal,
            RAGGED=lengths is not None,
            DOT_PRECISION=_dot_precision(q.dtype),
        )
    return out, lse


def _launch_delta(out: torch.Tensor, grad_out: torch.Tensor, delta: torch.Tensor) -> None:
    """The backward's pre-pass: ``delta`` (B·H, Tq) fp32 ← rowsum(dO ∘ O), shared by both backwards."""
    batch, heads, t_q, head_dim = out.shape
    block = _kernels.DELTA_BLOCK_M
    _kernels._attention_backward_delta[(_cdiv(t_q, block), batch * heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, t_q, HEAD_DIM=head_dim, BLOCK_M=block
    )


def _backward(grad_out, q, k, v, out, lse, causal: bool, sm_scale: float, lengths=None):
    """Run the three backward kernels: delta pre-pass, dK/dV (one program per key/value head), dQ."""
    batch, heads, t_q, head_dim = q.shape
    kv_heads, t_k = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((batch * heads, t_q), device=q.device, dtype=torch.float32)
    qk_scale = sm_scale * math.log2(math.e)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, RAGGED=lengths is not None, DOT_PRECISION=_dot_precision(q.dtype))
    row_lengths = lse if lengths is None else lengths  # unread without lengths (RAGGED=False)
    with _launch_context(q):
        _launch_delta(out, grad_out, delta)
        _kernels._attention_backward_dkdv[lambda meta: (_cdiv(t_k, meta["BLOCK_N"]), batch * kv_heads)](
            q,
            k,
            v,
            grad_out,
            dk,
            dv,
            lse,
            delta,
            row_lengths,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(grad_out),
            *_strides(dk),
            *_strides(dv),
            heads,
            _group(q, k),
            t_q,
            t_k,
            qk_scale,
            sm_scale,
            _bucket(t_q),
            _bucket(t_k),
            **common,
        )
        _kernels._attention_backward_dq[lambda meta: (_cdiv(t_q, meta["BLOCK_M"]), batch * heads)](
            q,
            k,
            v,
            grad_out,
            dq,
            lse,
            delta,
            row_lengths,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(grad_out),
            *_strides(dq),
            heads,
            _group(q, k),
            t_q,
            t_k,
            qk_scale,
            sm_scale,
            _bucket(t_q),
            _bucket(t_k),
            **common,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


class FlashAttention(torch.autograd.Function):
    """Forward saves Q, K, V, O, the row lse (and the lengths); backward recomputes P tile by tile from them."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, lengths: torch.Tensor | None = None):
        out, lse = _forward(q, k, v, causal, sm_scale, lengths)
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, lengths = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.sm_scale, lengths)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, lengths: torch.Tensor | None = None
) -> None:
    """Raise ValueError naming what is wrong with ``q, k, v`` (and ``lengths``); shared by the kernel and
    the dispatcher. The values of ``lengths`` are checked on the CPU only: on a GPU that read would wait
    for the device at every call (the batched engine, their one caller there, computes them itself)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"attention expects 4-D (batch, heads, time, head_dim) tensors, got {name} of shape {shape}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch and head_dim")
    heads, kv_heads = q.shape[1], k.shape[1]
    if (kv_heads == 0 and heads != 0) or (kv_heads != 0 and heads % kv_heads != 0):
        raise ValueError(
            f"q has {heads} heads, not a multiple of k/v's {kv_heads} heads (grouped-query attention needs one)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention supports float16, bfloat16 and float32, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {q.shape[3]} is not supported by the Triton kernel: use one of {SUPPORTED_HEAD_DIMS}"
        )
    if k.shape[2] == 0:
        raise ValueError("attention needs at least one key (k has time 0)")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal attention needs no more queries than keys (queries are the last positions), "
            f"got {q.shape[2]} queries and {k.shape[2]} keys"
        )
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        raise ValueError(f"batch × heads = {q.shape[0] * q.shape[1]} exceeds the kernel's grid limit {_MAX_GRID_Y}")
    if lengths is not None:
        _check_lengths(lengths, q, k)


def _check_lengths(lengths: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    batch, t_q, t_k = q.shape[0], q.shape[2], k.shape[2]
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,):
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must have shape (batch,) = ({batch},), got {shape}")
    if lengths.dtype != torch.int64:
        raise ValueError(f"lengths must be int64, got {lengths.dtype}")
    if lengths.device != q.device:
        raise ValueError(f"lengths must be on q's device {q.device}, got {lengths.device}")
    if batch == 0 or lengths.is_cuda:  # on a GPU reading the values back would stall every call: trusted
        return
    low, high = (int(x) for x in torch.aminmax(lengths))
    if low < t_q or high > t_k:
        raise ValueError(
            f"lengths must be between the query count {t_q} and the key count {t_k}, got values in [{low}, {high}]"
        )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(sm_scale·QKᵀ [+ causal mask])·V by the Triton kernels, differentiable.

    ``q`` (B, H, Tq, D), ``k`` and ``v`` (B, Hkv, Tk, D) with ``H`` a multiple of ``Hkv`` (grouped-query
    attention: query head ``h`` reads key/value head ``h // (H / Hkv)``, Ainslie et al. 2023), of one
    dtype (fp16, bf16, fp32; fp32 accumulation inside) on one device; any strides. ``q`` may have fewer
    rows than ``k``/``v``: queries are then the last positions and the causal mask is aligned
    bottom-right. ``lengths`` (B,) int64 on the same device, optional: row ``b`` has ``lengths[b]`` valid
    keys, ``Tq <= lengths[b] <= Tk``, and its queries are its last ``Tq`` valid positions (query ``i``
    sees keys ``j < lengths[b]``, and ``j <= lengths[b] - Tq + i`` when causal); padding keys are never
    read and get zero gradients. ``sm_scale`` defaults to ``1/sqrt(head_dim)``. Needs triton, and CUDA
    tensors (or ``TRITON_INTERPRET=1`` set before import, for any device).
    """
    if _kernels is None:
        raise RuntimeError(f"flash_attention needs triton: {TRITON_IMPORT_ERROR}")
    check_inputs(q, k, v, causal, lengths)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if lengths is not None:
        lengths = lengths.contiguous()
    return FlashAttention.apply(q, k, v, bool(causal), float(sm_scale), lengths)


def fallback_reason(q: torch.Tensor) -> str | None:
    """None when the Triton kernel can run on ``q``; otherwise why not, in a few words."""
    if _kernels is None:
        return TRITON_IMPORT_ERROR
    if _kernels.INTERPRETED:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "the kernels were built for the Triton interpreter but TRITON_INTERPRET is no longer 1"
        if q.dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 matmuls wrongly (numpy has no bfloat16)"
        return None
    if not q.is_cuda:
        return (
            f"tensors are on {q.device.type}, and the Triton kernels need CUDA "
            "(or TRITON_INTERPRET=1 set before import)"
        )
    return None


_fallback_logged = False


CPU_FP32_MAX_KEYS = 128
"""Longest key sequence for which :func:`sdpa_attention` trains bf16/fp16 inputs on CPU in float32: the
inputs are cast up, SDPA's float32 flash backend runs, the output is cast back (autograd casts the
gradients). PyTorch's CPU flash backward is slow in low precision for short sequences, and its math
backend is slower than float32 flash. Causal forward + backward at B=12 H=4 T=128 D=32 (the seed
preset's attention): 15.5 ms bf16 flash, 5.4 ms bf16 math, 3.9 ms float32 flash, casts included; at
D=16 31.6, 7.2 and 4.7 ms. For long sequences bf16 flash is the fastest (116.6 against 216.6 ms at B=4
H=8 T=1024 D=64), and around 256 keys the two are within noise of each other. torch 2.13, 2 threads, an
Intel Xeon with AMX (``benchmarks/sdpa_cpu_backends.py``); an AMD EPYC with AVX512-BF16 ranked them
alike at T=128 (6.9, 4.1 and 2.5 ms, the last without the casts)."""


def _trains_in_float32(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this call runs in float32 through SDPA's flash backend (see :data:`CPU_FP32_MAX_KEYS`)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and q.requires_grad
        and k.shape[2] <= CPU_FP32_MAX_KEYS
    )


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    lengths: torch.Tensor | None = None,
    backend: SDPBackend | None = None,
) -> torch.Tensor:
    """PyTorch's SDPA with bottom-right causal alignment when queries are fewer than keys.

    ``q`` (B, H, Tq, D); ``k``, ``v`` (B, Hkv, Tk, D) with ``H`` a multiple of ``Hkv`` (grouped-query
    attention: query head ``h`` reads key/value head ``h // (H / Hkv)``, Ainslie et al. 2023).
    ``lengths`` (B,) int64, optional: row ``b`` has ``lengths[b]`` valid keys (the rest is padding) and
    its queries are its last ``Tq`` valid positions, so query ``i`` sees keys ``j < lengths[b]`` and, when
    causal, ``j <= lengths[b] - Tq + i``. (SDPA's own ``is_causal`` aligns top-left; a single query sees
    every key either way.) ``backend``: the one SDPA backend to use (PyTorch raises ``RuntimeError`` "No
    available kernel" when it cannot run the inputs). ``None``: PyTorch picks, except when training on CPU
    in bf16/fp16 with at most :data:`CPU_FP32_MAX_KEYS` keys, where float32 is the faster (the output is
    then cast back to ``q``'s dtype).
    """
    if backend is not None:
        with sdpa_kernel(backend):
            return _sdpa(q, k, v, causal, lengths)
    if _trains_in_float32(q, k):
        with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA's inputs back down
            return _sdpa(q.float(), k.float(), v.float(), causal, lengths).to(q.dtype)
    return _sdpa(q, k, v, causal, lengths)


def visible_keys(t_q: int, t_k: int, causal: bool, lengths: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The boolean mask of which key each query sees: (Tq, Tk), or (B, 1, Tq, Tk) with ``lengths`` (see
    :func:`sdpa_attention`). A query that would see no key (a padded query of a short row) sees key 0, so
    no row of the softmax is empty."""
    keys = torch.arange(t_k, device=device)
    if lengths is None:
        return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)
    ends = lengths.to(device)[:, None, None, None]  # (B, 1, 1, 1)
    if t_q == 1:  # decoding: the one query sees every valid key (causal or not), and key 0 always
        return keys < ends.clamp(min=1)
    mask = keys < ends
    if causal:
        last = ends - t_q + torch.arange(t_q, device=device)[:, None]  # (B, 1, Tq, 1): each query's last key
        mask = mask & (keys <= last)
    return mask | (keys == 0)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    t_q, t_k = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]  # False is SDPA's default: plain attention is passed as before
    if lengths is not None:
        mask = visible_keys(t_q, t_k, causal, lengths, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if not causal or t_q == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    visible = visible_keys(t_q, t_k, causal, None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton kernel where it can run, else PyTorch SDPA (same maths); the first fallback logs why.

    Grouped-query ``k``/``v`` and per-row ``lengths`` as in :func:`flash_attention`. Inputs are validated
    the same way on both paths, so a model that works here works on a GPU.
    """
    global _fallback_logged
    check_inputs(q, k, v, causal, lengths)
    reason = fallback_reason(q)
    if reason is None:
        if lengths is not None:
            lengths = lengths.contiguous()
        return FlashAttention.apply(q, k, v, bool(causal), 1.0 / math.sqrt(q.shape[-1]), lengths)
    if not _fallback_logged:
        _fallback_logged = True
        logger.warning("Triton attention fell back to torch scaled_dot_product_attention: %s", reason)
    return sdpa_attention(q, k, v, causal, lengths)

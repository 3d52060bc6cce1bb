"""A one-pass FlashAttention-2 backward: dK, dV and dQ from one kernel, dQ accumulated with atomics.

The three-pass backward in :mod:`flash_attention_kernels` runs a dK/dV kernel over query blocks and a
separate dQ kernel over key blocks, and *each* recomputes ``S = QKᵀ`` and ``dP = dO·Vᵀ``: seven
``Tq×Tk×D`` matmuls, ``3.5×`` the forward's FLOPs. Here one program per (key tile, batch·head) keeps
its K and V tile on chip and loops over query blocks, computing for each

* ``P = exp2(S·log2(e)·sm_scale − lse)`` (from the forward's saved base-2 row log-sum-exp),
* ``dV += Pᵀ·dO``, ``dP = dO·Vᵀ``, ``dS = P∘(dP − delta)``, ``dK += dSᵀ·Q``,
* ``dQ[rows] += sm_scale·dS·K``, added into an fp32 ``(B, H, Tq, D)`` buffer with ``tl.atomic_add``,

five matmuls, ``2.5×`` the forward's FLOPs (``10·Tq·Tk·D`` per (batch, head), about half of that when
causal with ``Tq == Tk``), the count the FlashAttention-2 paper gives (Dao 2023, arXiv:2307.08691,
Algorithm 2 and §3.2: "we use atomic adds to communicate between different thread blocks to update
dQ"). The price is atomic traffic: every (key tile, query block) pair that is visible adds a
``BLOCK_M×D`` fp32 tile, so each dQ element receives ``⌈Tk/BLOCK_N⌉`` atomic adds (about half when
causal): ``4·Tq·D·⌈Tk/BLOCK_N⌉`` bytes of reductions per (batch, head), e.g. 32 MiB at Tq=Tk=4096,
D=64, BLOCK_N=128 (16 MiB causal). They resolve in L2; the fp32 buffer costs ``4·Tq·D`` bytes per
(batch, head) of extra memory, and a final cast to the input dtype (skipped for fp32 inputs, whose
buffer is the result). Atomics make dQ's summation order, and so its last bits, run-to-run
nondeterministic.

Conventions are those of :mod:`flash_attention_kernels`: ``(batch, heads, time, head_dim)`` tensors
addressed through their strides; ``BLOCK_M`` query rows, ``BLOCK_N`` key rows; scores in the log2
domain (``qk_scale = sm_scale·log2(e)``); causal aligned bottom-right (query ``i`` sees key ``j`` when
``j <= i + kv_offset``, ``kv_offset = Tk − Tq``); loops split into *full* blocks (no masks) and *edge*
blocks (the causal band and the ragged tail). The delta pre-pass (``delta_i = Σ_d dO_id·O_id``) is the
three-pass backward's own kernel.

**It does not pay on Hopper**, measured on an H200 (triton 3.6.0, causal bf16, T=4096, B·H·T = 524288,
H·D = 2048, ``benchmarks/attention_gpu.py --variants``): forward+backward 3.257 ms vs the three-pass's
3.041 at D=64 (0.77× vs 0.83× of SDPA's default backend), 6.416 vs 5.556 ms at D=128 (0.63× vs 0.73×):
the atomic adds cost more than the two recomputed matmuls save. So :class:`FlashAttention` keeps the
three-pass backward; this one stays as the benchmark's variant, tested, for GPUs or tile shapes where
atomics are cheaper (FlashAttention-2's CUDA kernels use them).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .flash_attention import _bucket, _cdiv, _dot_precision, _launch_context, _launch_delta, _strides
from .flash_attention_kernels import (
    TUNING_KEY,
    _config,
    _tile,
    _tuning,
)

# Hopper (H100/H200) candidates: each compiled and checked against float64 on an H200 (triton 3.6.0);
# the autotuner picked 64x64 w4 s3 at D=64 and 32x128 w8 s2 at D=128 (module docstring: the timings).
# A program keeps a BLOCK_N-row key tile, its V tile and two fp32 accumulators (dK, dV) of that size while thin query
# tiles stream past; BLOCK_N = 128 halves the atomic adds into dQ against 64. At head dim 128 the
# accumulators alone take 2·BLOCK_N·128 fp32 registers, so big tiles need 8 warps.
FUSED_CONFIGS = {
    "head_dim<=64": [
        _config(32, 128, 4, 3),
        _config(64, 128, 8, 3),
        _config(64, 64, 4, 3),
        _config(128, 128, 8, 2),
        _config(32, 64, 4, 2),
    ],
    "head_dim=128": [
        _config(32, 64, 4, 3),
        _config(64, 128, 8, 2),
        _config(64, 64, 8, 3),
        _config(32, 128, 8, 2),
    ],
    "fp32": [_config(32, 64, 8, 2)],
}
SIZE_ARGS = ["H", "Tq", "Tk", "TQ_BUCKET", "TK_BUCKET"]


@triton.jit
def _fused_query_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    dq_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_qd,
    stride_dot,
    stride_dod,
    stride_dqt,
    stride_dqd,
    offs_n,
    offs_d,
    query_start,
    query_end,
    Tq,
    kv_offset,
    qk_scale,
    sm_scale,
    CAUSAL: tl.constexpr,
    EDGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """For one key tile (k, v: BLOCK_N×D), over query blocks [query_start, query_end):
    dV += Pᵀ·dO and dK += dSᵀ·Q in registers, dQ += sm_scale·dS·K by atomic adds.

    Score tiles are transposed (keys down the rows, BLOCK_N×BLOCK_M) so dK and dV are plain row tiles.
    Padded key rows (>= Tk) were loaded as zeros: their dS·K contribution to dQ is zero, and their own
    dK/dV rows are never stored, so only the query side is masked.
    """
    for start_m in range(query_start, query_end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = _tile(q_base, offs_m, offs_d, stride_qt, stride_qd)
        do_ptrs = _tile(do_base, offs_m, offs_d, stride_dot, stride_dod)
        dq_ptrs = _tile(dq_base, offs_m, offs_d, stride_dqt, stride_dqd)
        if EDGE:
            row_ok = offs_m < Tq
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if EDGE:
            visible = offs_m[None, :] < Tq
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + kv_offset)
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * sm_scale
        if EDGE:
            tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < Tq, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.autotune(key=TUNING_KEY, **_tuning(FUSED_CONFIGS, reset_to_zero=["DQ"]))
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attention_backward_fused(
    Q,
    K,
    V,
    DO,
    DQ,
    DK,
    DV,
    LSE,
    DELTA,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    H,
    Tq,
    Tk,
    qk_scale,
    sm_scale,
    TQ_BUCKET,
    TK_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_N key rows of one (batch, head). Writes their dK and dV rows and adds its
    share of every visible query row's dQ into the fp32 ``DQ`` (zeroed by the launcher)."""
    start_n = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    batch = (batch_head // H).to(tl.int64)
    head = (batch_head % H).to(tl.int64)
    kv_offset = Tk - Tq

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < Tk
    k_ptrs = _tile(K + batch * stride_kb + head * stride_kh, offs_n, offs_d, stride_kt, stride_kd)
    v_ptrs = _tile(V + batch * stride_vb + head * stride_vh, offs_n, offs_d, stride_vt, stride_vd)
    k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    q_base = Q + batch * stride_qb + head * stride_qh
    do_base = DO + batch * stride_dob + head * stride_doh
    dq_base = DQ + batch * stride_dqb + head * stride_dqh
    lse_base = LSE + batch_head.to(tl.int64) * Tq
    delta_base = DELTA + batch_head.to(tl.int64) * Tq
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # As in the three-pass dK/dV kernel. Causal: query rows before `first` see none of this key tile,
    # rows from `full_start` on see all of it; the band between is masked, and so is a ragged last
    # query block.
    full_stop = (Tq // BLOCK_M) * BLOCK_M
    edge_stop = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    first = 0
    full_start = 0
    if CAUSAL:
        first = (tl.maximum(start_n - kv_offset, 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - kv_offset, 0), BLOCK_M) * BLOCK_M
    dk, dv = _fused_query_blocks(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        dq_base,
        lse_base,
        delta_base,
        stride_qt,
        stride_qd,
        stride_dot,
        stride_dod,
        stride_dqt,
        stride_dqd,
        offs_n,
        offs_d,
        first,
        tl.minimum(full_start, edge_stop),
        Tq,
        kv_offset,
        qk_scale,
        sm_scale,
        CAUSAL,
        True,
        BLOCK_M,
        DOT_PRECISION,
    )
    dk, dv = _fused_query_blocks(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        dq_base,
        lse_base,
        delta_base,
        stride_qt,
        stride_qd,
        stride_dot,
        stride_dod,
        stride_dqt,
        stride_dqd,
        offs_n,
        offs_d,
        full_start,
        full_stop,
        Tq,
        kv_offset,
        qk_scale,
        sm_scale,
        CAUSAL,
        False,
        BLOCK_M,
        DOT_PRECISION,
    )
    dk, dv = _fused_query_blocks(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        dq_base,
        lse_base,
        delta_base,
        stride_qt,
        stride_qd,
        stride_dot,
        stride_dod,
        stride_dqt,
        stride_dqd,
        offs_n,
        offs_d,
        tl.maximum(full_start, full_stop),
        edge_stop,
        Tq,
        kv_offset,
        qk_scale,
        sm_scale,
        CAUSAL,
        True,
        BLOCK_M,
        DOT_PRECISION,
    )

    dk = dk * sm_scale  # S = sm_scale·QKᵀ, so dK = sm_scale·dSᵀQ
    dk_ptrs = _tile(DK + batch * stride_dkb + head * stride_dkh, offs_n, offs_d, stride_dkt, stride_dkd)
    dv_ptrs = _tile(DV + batch * stride_dvb + head * stride_dvh, offs_n, offs_d, stride_dvt, stride_dvd)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def backward_fused(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV of ``out = softmax(sm_scale·QKᵀ [+ causal mask])·V`` by the delta pre-pass and the
    fused kernel; the same contract as ``flash_attention._backward``.

    ``q``, ``out``, ``grad_out``: (B, H, Tq, D); ``k``, ``v``: (B, H, Tk, D); one dtype (fp16, bf16 or
    fp32), any strides, on CUDA (or any device under ``TRITON_INTERPRET=1``). ``lse``: (B·H, Tq) fp32,
    the forward's base-2 row log-sum-exp. No grouped-query attention and no per-row lengths. Returns gradients shaped and laid out like ``q``, ``k``, ``v``.
    FLOPs: ``10·B·H·Tq·Tk·D`` (halved when causal with Tq == Tk), ``2.5×`` the forward. Extra memory:
    the fp32 dQ accumulator, ``4·B·H·Tq·D`` bytes (none for fp32 inputs), and delta, ``4·B·H·Tq``.
    """
    batch, heads, t_q, head_dim = q.shape
    t_k = k.shape[2]
    if k.shape[1] != heads:
        raise ValueError(f"backward_fused needs as many key/value heads as query heads, got {k.shape[1]} and {heads}")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # The atomics add into fp32: for fp32 inputs that is dQ itself, otherwise a buffer cast at the end.
    dq_acc = torch.zeros_like(q, dtype=torch.float32)
    if q.numel() == 0 or t_k == 0:
        return dq_acc.to(q.dtype), dk.zero_(), dv.zero_()
    delta = torch.empty((batch * heads, t_q), device=q.device, dtype=torch.float32)
    # Launch on the tensors' GPU, not the current one.
    with _launch_context(q):
        _launch_delta(out, grad_out, delta)
        _attention_backward_fused[lambda meta: (_cdiv(t_k, meta["BLOCK_N"]), batch * heads)](
            q,
            k,
            v,
            grad_out,
            dq_acc,
            dk,
            dv,
            lse,
            delta,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(grad_out),
            *_strides(dq_acc),
            *_strides(dk),
            *_strides(dv),
            heads,
            t_q,
            t_k,
            sm_scale * math.log2(math.e),
            sm_scale,
            _bucket(t_q),
            _bucket(t_k),
            HEAD_DIM=head_dim,
            CAUSAL=bool(causal),
            DOT_PRECISION=_dot_precision(q.dtype),
        )
    dq = dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)
    return dq, dk, dv

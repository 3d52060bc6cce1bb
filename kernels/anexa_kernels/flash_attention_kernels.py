"""The Triton kernels behind :mod:`flash_attention`: forward, and the FA2 backward in three passes.

This module imports triton unconditionally; :mod:`flash_attention` imports it only when triton is
installed. All kernels work on ``(batch, heads, time, head_dim)`` tensors addressed through their
strides, so transposed views need no copy. Naming is shared by every kernel: ``BLOCK_M`` rows of
queries, ``BLOCK_N`` rows of keys, query row ``i`` at absolute position ``i + kv_offset`` where
``kv_offset = Tk - Tq`` (queries are the last ``Tq`` positions; causal means key ``j`` is visible to
query ``i`` when ``j <= i + kv_offset``).

Grouped-query attention (GQA, Ainslie et al. 2023): Q has ``H`` heads, K and V ``H / GROUP``; query
head ``h`` reads key/value head ``h // GROUP``. The forward and dQ kernels run one program per query
head; the dK/dV kernel runs one per key/value head and loops over the ``GROUP`` query heads that read
it, so dK and dV are written once, without atomics.

Ragged rows (``RAGGED``, a constexpr, so the kernels without it compile exactly as before): ``LENGTHS``
(B,) int64 gives row ``b`` its own key count ``Tk = LENGTHS[b]`` (keys past it are padding, never read)
and ``kv_offset = LENGTHS[b] - Tq``; the launcher checks ``Tq <= LENGTHS[b] <= Tk``. The dK/dV rows of
padding keys are written as zeros.

Scores live in the log2 domain: ``s = q·k * sm_scale * log2(e)``, so ``exp2`` replaces ``exp`` and the
saved row log-sum-exp ``lse`` is in base 2 too (``p = exp2(s - lse)``).

Every loop is split in two kinds of blocks: *full* ones (all in bounds, all visible: no mask, no
bounds checks) and *edge* ones (the causal diagonal band and the ragged tail: masked). Causal
attention skips the blocks above the diagonal entirely.
"""

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Kernels built for Triton's CPU interpreter (decided by triton itself when ``@triton.jit`` runs)."""


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Launch configs for Hopper (H100/H200), per kernel and per case; the autotuner times the case's
# candidates once per key and keeps the fastest. Chosen from sm_90 compiles (ptxas register and
# shared-memory reports): at head dim 128 the 4-warp versions of the big tiles spill registers, and
# fp32 inputs (operands twice the size, three tensor-core products each with tf32x3) fit small tiles.
# Forward and dQ keep a query tile in registers while key tiles stream past; dK/dV keeps a key tile
# and two fp32 accumulators of its size while thin query tiles stream past.
FORWARD_CONFIGS = {
    "head_dim<=64": [
        _config(128, 64, 4, 3),
        _config(128, 128, 8, 3),
        _config(128, 64, 8, 4),
        _config(64, 64, 4, 3),
    ],
    "head_dim=128": [_config(128, 128, 8, 3), _config(128, 64, 8, 4), _config(64, 64, 4, 3)],
    "fp32": [_config(64, 32, 4, 2)],
}
DKDV_CONFIGS = {
    "head_dim<=64": [
        _config(32, 128, 4, 3),
        _config(64, 128, 8, 3),
        _config(32, 64, 4, 4),
        _config(64, 64, 4, 3),
    ],
    "head_dim=128": [_config(32, 64, 4, 4), _config(64, 128, 8, 3), _config(64, 64, 8, 3)],
    "fp32": [_config(32, 64, 8, 2)],
}
DQ_CONFIGS = {
    "head_dim<=64": [
        _config(128, 32, 4, 3),
        _config(128, 64, 8, 3),
        _config(64, 32, 4, 4),
        _config(64, 64, 4, 3),
    ],
    "head_dim=128": [_config(128, 64, 8, 3), _config(64, 32, 4, 4), _config(64, 64, 4, 3)],
    "fp32": [_config(64, 32, 4, 2)],
}
# The interpreter cannot autotune several configs (triton 3.9) and pays per program and per op, not
# per element: one config each, large tiles.
INTERPRETER_CONFIG = _config(64, 64, 4, 1)
DELTA_BLOCK_M = 64

# Autotune once per head dim, causality and power-of-two bucket of the lengths (the dtype is part of
# every key anyway), not per exact length: decoding with a growing KV cache would re-tune every step.
TUNING_KEY = ["HEAD_DIM", "CAUSAL", "TQ_BUCKET", "TK_BUCKET"]
# Sizes are runtime values, not specialised on (==1, %16): one binary serves every shape.
SIZE_ARGS = ["H", "GROUP", "Tq", "Tk", "TQ_BUCKET", "TK_BUCKET"]


def config_case(element_size: int, head_dim: int) -> str:
    """Which list of candidate configs serves inputs of this element size and head dim."""
    if element_size == 4:
        return "fp32"
    return "head_dim=128" if head_dim > 64 else "head_dim<=64"


def _tuning(table: dict, reset_to_zero: list[str] | None = None) -> dict:
    """Arguments for ``triton.autotune``: every candidate, and a pruner that keeps the input's case.
    ``reset_to_zero``: outputs a kernel accumulates into (atomics), zeroed before each timed candidate."""
    reset = {"reset_to_zero": reset_to_zero} if reset_to_zero else {}
    if INTERPRETED:
        return {"configs": [INTERPRETER_CONFIG], **reset}

    def case_configs(configs, named_args, **kwargs):
        return table[config_case(named_args["Q"].element_size(), kwargs["HEAD_DIM"])]

    every = [config for configs in table.values() for config in configs]
    return {"configs": every, "prune_configs_by": {"early_config_prune": case_configs}, **reset}


@triton.jit
def _tile(base, offs_t, offs_d, stride_t, stride_d):
    """Pointers to rows ``offs_t`` (every head-dim column) of one (batch, head) slice."""
    return base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d


@triton.jit
def _tile_t(base, offs_t, offs_d, stride_t, stride_d):
    """The same tile transposed, head dim down the rows: the right-hand operand of a dot."""
    return base + offs_t[None, :] * stride_t + offs_d[:, None] * stride_d


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _forward_key_blocks(
    acc,
    row_sum,
    row_max,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    offs_m,
    offs_d,
    key_start,
    key_end,
    Tk,
    kv_offset,
    qk_scale,
    CAUSAL: tl.constexpr,
    EDGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [key_start, key_end): rescale the running sums, add this block."""
    for start_n in range(key_start, key_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = _tile_t(k_base, offs_n, offs_d, stride_kt, stride_kd)
        v_ptrs = _tile(v_base, offs_n, offs_d, stride_vt, stride_vd)
        if EDGE:
            k_t = tl.load(k_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if EDGE:
            visible = offs_n[None, :] < Tk
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + kv_offset)
            s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        p = tl.math.exp2(s - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.autotune(key=TUNING_KEY, **_tuning(FORWARD_CONFIGS))
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attention_forward(
    Q,
    K,
    V,
    O,
    LSE,
    LENGTHS,
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
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    H,
    GROUP,
    Tq,
    Tk,
    qk_scale,
    TQ_BUCKET,
    TK_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    RAGGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head); writes their output rows and lse."""
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // H).to(tl.int64)
    head = (batch_head % H).to(tl.int64)
    kv_head = head // GROUP
    if RAGGED:
        Tk = tl.load(LENGTHS + batch).to(tl.int32)  # this row's keys; the rest is padding
    kv_offset = Tk - Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q_ptrs = _tile(Q + batch * stride_qb + head * stride_qh, offs_m, offs_d, stride_qt, stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Full key blocks end where the tile's first query stops seeing all of them (causal) or at the
    # last complete block; edge blocks run to the tile's last visible key.
    full_end = (Tk // BLOCK_N) * BLOCK_N
    edge_end = Tk
    if CAUSAL:
        full_end = tl.minimum(full_end, ((start_m + kv_offset + 1) // BLOCK_N) * BLOCK_N)
        edge_end = tl.minimum(Tk, start_m + BLOCK_M + kv_offset)
    acc, row_sum, row_max = _forward_key_blocks(
        acc,
        row_sum,
        row_max,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        offs_m,
        offs_d,
        0,
        full_end,
        Tk,
        kv_offset,
        qk_scale,
        CAUSAL,
        False,
        BLOCK_N,
        DOT_PRECISION,
    )
    acc, row_sum, row_max = _forward_key_blocks(
        acc,
        row_sum,
        row_max,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        offs_m,
        offs_d,
        full_end,
        edge_end,
        Tk,
        kv_offset,
        qk_scale,
        CAUSAL,
        True,
        BLOCK_N,
        DOT_PRECISION,
    )

    # Every real row has seen key 0 (causal queries sit at or after it), so row_sum > 0.
    out = acc / row_sum[:, None]
    tl.store(LSE + batch_head.to(tl.int64) * Tq + offs_m, row_max + tl.math.log2(row_sum), mask=row_ok)
    o_ptrs = _tile(O + batch * stride_ob + head * stride_oh, offs_m, offs_d, stride_ot, stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2): delta pre-pass, then dK/dV over query blocks, then dQ over key blocks.
# Both main kernels recompute P = exp2(S - lse) from the saved lse instead of storing P.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _attention_backward_delta(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    H,
    Tq,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = Σ_d dO_id·O_id = Σ_j P_ij·dP_ij, the softmax-gradient correction term of each row."""
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // H).to(tl.int64)
    head = (batch_head % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    o_ptrs = _tile(O + batch * stride_ob + head * stride_oh, offs_m, offs_d, stride_ot, stride_od)
    do_ptrs = _tile(DO + batch * stride_dob + head * stride_doh, offs_m, offs_d, stride_dot, stride_dod)
    o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + batch_head.to(tl.int64) * Tq + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_query_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_qd,
    stride_dot,
    stride_dod,
    offs_n,
    offs_d,
    query_start,
    query_end,
    Tq,
    kv_offset,
    qk_scale,
    CAUSAL: tl.constexpr,
    EDGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dV += Pᵀ·dO and dK += dSᵀ·Q for one key tile, over query blocks [query_start, query_end).

    Works on transposed score tiles (keys down the rows) so both accumulators are plain row tiles.
    """
    for start_m in range(query_start, query_end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = _tile_t(q_base, offs_m, offs_d, stride_qt, stride_qd)
        do_ptrs = _tile(do_base, offs_m, offs_d, stride_dot, stride_dod)
        if EDGE:
            row_ok = offs_m < Tq
            q_t = tl.load(q_ptrs, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            q_t = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if EDGE:
            visible = offs_m[None, :] < Tq
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + kv_offset)
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(key=TUNING_KEY, **_tuning(DKDV_CONFIGS))
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attention_backward_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    LENGTHS,
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
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    H,
    GROUP,
    Tq,
    Tk,
    qk_scale,
    sm_scale,
    TQ_BUCKET,
    TK_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    RAGGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_N key rows of one (batch, key/value head); sums over the GROUP query heads
    that read them, then writes their dK and dV rows."""
    start_n = tl.program_id(0) * BLOCK_N
    batch_kv_head = tl.program_id(1)
    kv_heads = H // GROUP
    batch = (batch_kv_head // kv_heads).to(tl.int64)
    kv_head = (batch_kv_head % kv_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    store_ok = offs_n < Tk  # every key row of the tensor is written, padding included
    if RAGGED:
        Tk = tl.load(LENGTHS + batch).to(tl.int32)  # this row's keys; the rest is padding
    kv_offset = Tk - Tq

    key_ok = offs_n < Tk
    k_ptrs = _tile(K + batch * stride_kb + kv_head * stride_kh, offs_n, offs_d, stride_kt, stride_kd)
    v_ptrs = _tile(V + batch * stride_vb + kv_head * stride_vh, offs_n, offs_d, stride_vt, stride_vd)
    k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Padded key rows (>= Tk) only pollute their own dK/dV rows, which are never stored (or, for ragged
    # rows, stored as zeros), so only the query side needs masks. Causal: query rows before `first` see
    # none of this tile, rows from `full_start` on see all of it; the band between is masked, and so is
    # a ragged last query block. The bounds are the same for every query head of the group.
    full_stop = (Tq // BLOCK_M) * BLOCK_M
    edge_stop = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    first = 0
    full_start = 0
    if CAUSAL:
        first = (tl.maximum(start_n - kv_offset, 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - kv_offset, 0), BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        head = kv_head * GROUP + g
        batch_head = batch * H + head
        q_base = Q + batch * stride_qb + head * stride_qh
        do_base = DO + batch * stride_dob + head * stride_doh
        lse_base = LSE + batch_head * Tq
        delta_base = DELTA + batch_head * Tq
        dk, dv = _dkdv_query_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_qd,
            stride_dot,
            stride_dod,
            offs_n,
            offs_d,
            first,
            tl.minimum(full_start, edge_stop),
            Tq,
            kv_offset,
            qk_scale,
            CAUSAL,
            True,
            BLOCK_M,
            DOT_PRECISION,
        )
        dk, dv = _dkdv_query_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_qd,
            stride_dot,
            stride_dod,
            offs_n,
            offs_d,
            full_start,
            full_stop,
            Tq,
            kv_offset,
            qk_scale,
            CAUSAL,
            False,
            BLOCK_M,
            DOT_PRECISION,
        )
        dk, dv = _dkdv_query_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_qd,
            stride_dot,
            stride_dod,
            offs_n,
            offs_d,
            tl.maximum(full_start, full_stop),
            edge_stop,
            Tq,
            kv_offset,
            qk_scale,
            CAUSAL,
            True,
            BLOCK_M,
            DOT_PRECISION,
        )

    dk = dk * sm_scale  # S = sm_scale·QKᵀ, so dK = sm_scale·dSᵀQ
    if RAGGED:  # padding keys get no gradient
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    dk_ptrs = _tile(DK + batch * stride_dkb + kv_head * stride_dkh, offs_n, offs_d, stride_dkt, stride_dkd)
    dv_ptrs = _tile(DV + batch * stride_dvb + kv_head * stride_dvh, offs_n, offs_d, stride_dvt, stride_dvd)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=store_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_ok[:, None])


@triton.jit
def _dq_key_blocks(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    offs_m,
    offs_d,
    key_start,
    key_end,
    Tk,
    kv_offset,
    qk_scale,
    CAUSAL: tl.constexpr,
    EDGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ += dS·K for one query tile over key blocks [key_start, key_end)."""
    for start_n in range(key_start, key_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = _tile_t(k_base, offs_n, offs_d, stride_kt, stride_kd)
        v_ptrs = _tile_t(v_base, offs_n, offs_d, stride_vt, stride_vd)
        if EDGE:
            k_t = tl.load(k_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
            v_t = tl.load(v_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v_t = tl.load(v_ptrs)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if EDGE:
            visible = offs_n[None, :] < Tk
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + kv_offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(key=TUNING_KEY, **_tuning(DQ_CONFIGS))
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attention_backward_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    LENGTHS,
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
    H,
    GROUP,
    Tq,
    Tk,
    qk_scale,
    sm_scale,
    TQ_BUCKET,
    TK_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    RAGGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head); writes their dQ rows."""
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // H).to(tl.int64)
    head = (batch_head % H).to(tl.int64)
    kv_head = head // GROUP
    if RAGGED:
        Tk = tl.load(LENGTHS + batch).to(tl.int32)  # this row's keys; the rest is padding
    kv_offset = Tk - Tq

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q_ptrs = _tile(Q + batch * stride_qb + head * stride_qh, offs_m, offs_d, stride_qt, stride_qd)
    do_ptrs = _tile(DO + batch * stride_dob + head * stride_doh, offs_m, offs_d, stride_dot, stride_dod)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + batch_head.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + batch_head.to(tl.int64) * Tq + offs_m, mask=row_ok, other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # The same full/edge split as the forward.
    full_end = (Tk // BLOCK_N) * BLOCK_N
    edge_end = Tk
    if CAUSAL:
        full_end = tl.minimum(full_end, ((start_m + kv_offset + 1) // BLOCK_N) * BLOCK_N)
        edge_end = tl.minimum(Tk, start_m + BLOCK_M + kv_offset)
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        offs_m,
        offs_d,
        0,
        full_end,
        Tk,
        kv_offset,
        qk_scale,
        CAUSAL,
        False,
        BLOCK_N,
        DOT_PRECISION,
    )
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        offs_m,
        offs_d,
        full_end,
        edge_end,
        Tk,
        kv_offset,
        qk_scale,
        CAUSAL,
        True,
        BLOCK_N,
        DOT_PRECISION,
    )

    dq = dq * sm_scale
    dq_ptrs = _tile(DQ + batch * stride_dqb + head * stride_dqh, offs_m, offs_d, stride_dqt, stride_dqd)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])

"""The Triton attention kernels against a float64 reference: output and dQ/dK/dV, masks, tails, strides,
grouped-query heads and ragged rows (per-row ``lengths``).

On CPU the real kernels run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), so
shapes stay tiny. With ``ANEXA_TEST_CUDA=1`` on a CUDA machine the same tests run compiled, plus the
cases the interpreter cannot do: bfloat16 and long sequences.

Tolerances are on the relative error ‖out − ref‖/‖ref‖ against float64 maths on the same (rounded)
inputs, so they measure the kernel alone:

* fp32: sums in fp32 (unit roundoff u = 6e-8); products exact on CPU, tf32x3 on the GPU (operands kept
  to about 21 bits, ~5e-7). Observed ~3e-7 on CPU; 1e-5 leaves room for tf32x3, the GPU's approximate
  exp2 and long rows, while one mis-masked key in a row of 130 adds an error near 1e-2.
* fp16: P and dS are rounded to fp16 (u = 4.9e-4) before their matmuls and outputs are stored in fp16;
  observed ~3e-4, bound 2e-3.
* bf16: the same with u = 3.9e-3; bound 1.6e-2.
"""

import importlib
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anexa_core import AnexaError
from anexa_kernels import attention, flash_attention

# The module itself (for monkeypatching): the package attribute of that name is the function.
fa = importlib.import_module("anexa_kernels.flash_attention")

ON_CUDA = os.environ.get("ANEXA_TEST_CUDA") == "1"
if ON_CUDA and not torch.cuda.is_available():
    pytest.skip("ANEXA_TEST_CUDA=1 but no CUDA device is visible", allow_module_level=True)
DEVICE = "cuda" if ON_CUDA else "cpu"

needs_triton = pytest.mark.skipif(fa._kernels is None, reason="triton is not installed")
gpu_only_bf16 = pytest.mark.skipif(
    not ON_CUDA, reason="bf16 runs on the GPU (ANEXA_TEST_CUDA=1): the Triton interpreter's bf16 dot is wrong"
)
gpu_only_long = pytest.mark.skipif(
    not ON_CUDA, reason="long sequences run on the GPU (ANEXA_TEST_CUDA=1): the interpreter is too slow"
)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, causal, sm_scale=None, lengths=None):
    """softmax(scale·QKᵀ)·V in float64, causal mask aligned bottom-right like Anexa's contract.

    Grouped-query k/v (fewer heads) serve query head h from head h // (H / Hkv); with ``lengths`` each
    row is computed alone over its first lengths[b] keys (its queries are its last positions)."""
    q, k, v = (t.double() for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if lengths is not None:
        rows = [
            reference_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], causal, sm_scale)
            for b, n in enumerate(lengths.tolist())
        ]
        return torch.cat(rows)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        t_q, t_k = q.shape[-2], k.shape[-2]
        visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def reference_with_grads(q, k, v, grad_out, causal, sm_scale=None, lengths=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, causal, sm_scale, lengths)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return out, grads


def relative_error(got, want) -> float:
    """‖got − want‖/‖want‖; the RMS of the difference where want is exactly zero (one visible key
    per row has no score gradient, so dQ and dK vanish)."""
    diff = (got.double() - want).norm()
    scale = want.norm()
    return (diff / scale).item() if scale > 0 else (diff / math.sqrt(want.numel())).item()


def random_qkv(batch, heads, t_q, t_k, head_dim, dtype, kv_heads=None):
    # q scaled up so softmax rows are peaked, not flat: exercises the running max and rescaling.
    kv_heads = heads if kv_heads is None else kv_heads
    q = 2 * torch.randn(batch, heads, t_q, head_dim, device=DEVICE)
    k = torch.randn(batch, kv_heads, t_k, head_dim, device=DEVICE)
    v = torch.randn(batch, kv_heads, t_k, head_dim, device=DEVICE)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty/empty_like hand out NaN-filled tensors, so an element a kernel never writes shows up.

    Returns the list of floating-point tensors handed out, so a test can check its outputs came from here.
    """
    handed_out = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
            handed_out.append(t)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    return handed_out


@pytest.fixture
def first_candidate_only(monkeypatch):
    """On CUDA, pin each kernel to the first candidate config of the case: autotuning every case would
    compile and time every candidate. Each candidate is checked on its own below; the benchmark tunes."""

    def pin(dtype, head_dim):
        if not ON_CUDA:
            return  # the interpreter has a single config anyway
        kernels = fa._kernels
        case = kernels.config_case(dtype.itemsize, head_dim)
        for kernel, table in (
            (kernels._attention_forward, kernels.FORWARD_CONFIGS),
            (kernels._attention_backward_dkdv, kernels.DKDV_CONFIGS),
            (kernels._attention_backward_dq, kernels.DQ_CONFIGS),
        ):
            monkeypatch.setattr(kernel, "configs", table[case][:1])

    return pin


def check_against_reference(
    batch, heads, t_q, t_k, head_dim, causal, dtype, poisoned, sm_scale=None, kv_heads=None, lengths=None
):
    q, k, v = random_qkv(batch, heads, t_q, t_k, head_dim, dtype, kv_heads)
    if lengths is not None:
        lengths = torch.tensor(lengths, device=DEVICE)
        with torch.no_grad():  # padding keys hold NaN: a kernel that reads one poisons its row
            for b, n in enumerate(lengths.tolist()):
                k[b, :, n:] = v[b, :, n:] = float("nan")
    grad_out = torch.randn(batch, heads, t_q, head_dim, device=DEVICE).to(dtype)
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, lengths=lengths)
    got_grads = torch.autograd.grad(out, (q, k, v), grad_out)  # not .backward(): .grad may be a copy
    want_out, want_grads = reference_with_grads(q, k, v, grad_out, causal, sm_scale, lengths)
    handed_out = {t.data_ptr() for t in poisoned}
    tolerance = TOLERANCE[dtype]
    for name, got, want in (("out", out, want_out), *zip(("dq", "dk", "dv"), got_grads, want_grads, strict=True)):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert got.data_ptr() in handed_out, f"{name} was not allocated through the poisoned torch.empty*"
        assert torch.isfinite(got).all(), f"{name} has elements the kernel never wrote (NaN), or inf"
        error = relative_error(got, want)
        assert error < tolerance, f"{name}: relative error {error:.2e} exceeds {tolerance:.0e}"


# ----------------------------------------------------------------------------------------------------
# Correctness against the float64 reference
# ----------------------------------------------------------------------------------------------------


# Each (dtype, head dim, causal) compiles its own kernels on CUDA (seconds each; fp32's tf32x3 code the
# most), so the CUDA run thins out the cases that only repeat tile arithmetic the CPU run covers.
cpu_only = pytest.mark.skipif(ON_CUDA, reason="checked on CPU; skipped on CUDA to bound compile time")


def _square_cases():
    cases = []
    for dtype, head_dim in (
        *((torch.float32, d) for d in (16, 32, 64)),
        *((torch.float16, d) for d in (16, 32, 64, 128)),
        *((torch.bfloat16, d) for d in (64, 128)),
    ):
        if dtype == torch.bfloat16:
            marks = (gpu_only_bf16,)
        elif (dtype, head_dim) in ((torch.float32, 16), (torch.float32, 64), (torch.float16, 32)):
            marks = (cpu_only,)
        else:
            marks = ()
        for t in (1, 17, 64, 130):
            for causal in (False, True):
                name = f"{str(dtype)[6:]}-d{head_dim}-t{t}-{'causal' if causal else 'full'}"
                cases.append(pytest.param(dtype, head_dim, t, causal, marks=marks, id=name))
    return cases


@needs_triton
@pytest.mark.parametrize("dtype, head_dim, t, causal", _square_cases())
def test_matches_reference(dtype, head_dim, t, causal, poisoned, first_candidate_only):
    first_candidate_only(dtype, head_dim)
    check_against_reference(1, 2, t, t, head_dim, causal, dtype, poisoned)


@needs_triton
@pytest.mark.parametrize(
    "t_q, t_k, head_dim, dtype",
    [
        (1, 130, 32, torch.float32),  # one decoding step over a cache
        (17, 130, 32, torch.float32),  # a prompt chunk after a cached prefix
        (64, 97, 32, torch.float16),
        (70, 200, 64, torch.float16),
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fewer_queries_than_keys(t_q, t_k, head_dim, dtype, causal, poisoned, first_candidate_only):
    """Queries are the last t_q positions; causal query i sees keys j <= i + t_k - t_q."""
    first_candidate_only(dtype, head_dim)
    check_against_reference(2, 1, t_q, t_k, head_dim, causal, dtype, poisoned)


@needs_triton
@pytest.mark.parametrize("kv_offset", [1, 2, 31, 32, 33, 62, 63, 64, 65, 126, 127, 128, 129])
@pytest.mark.parametrize("t_q", [63, 64, 70])
def test_causal_tile_boundaries(t_q, kv_offset, poisoned, first_candidate_only):
    """Which key tiles count as fully visible, masked or skipped depends on Tk - Tq modulo the tile
    sizes (32, 64, 128; 64 in the interpreter), and which query tiles are full on Tq: offsets just below,
    at and above those multiples, with a last query tile one row short, exact and ragged, catch
    off-by-one splits. Each off-by-one planted in the diagonal or tail bounds of the three kernels
    (docs/testing.md) fails at least three of these cases; with Tq = 70 alone, some failed only one."""
    first_candidate_only(torch.float32, 32)
    check_against_reference(1, 1, t_q, t_q + kv_offset, 32, True, torch.float32, poisoned)


@needs_triton
@pytest.mark.parametrize("t_q, t_k", [(17, 63), (64, 127), (130, 63)])
def test_key_tail_one_short_of_a_tile_without_mask(t_q, t_k, poisoned, first_candidate_only):
    """Without the causal band only the key count bounds the full tiles: Tk one short of a multiple of
    the tile must still mask its last tile."""
    first_candidate_only(torch.float32, 32)
    check_against_reference(1, 1, t_q, t_k, 32, False, torch.float32, poisoned)


@needs_triton
def test_more_queries_than_keys_without_mask(poisoned, first_candidate_only):
    first_candidate_only(torch.float32, 32)
    check_against_reference(1, 2, 130, 17, 32, False, torch.float32, poisoned)


@needs_triton
def test_custom_scale(poisoned, first_candidate_only):
    first_candidate_only(torch.float32, 32)
    check_against_reference(1, 1, 40, 40, 32, True, torch.float32, poisoned, sm_scale=0.7)


@needs_triton
@pytest.mark.parametrize("t_q, t_k", [(17, 17), (5, 70)])
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["multi-query", "grouped"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_grouped_query_heads(t_q, t_k, kv_heads, causal, poisoned, first_candidate_only):
    """Four query heads over one or two key/value heads: head h reads kv head h // 2 (with two), and
    dK/dV of a kv head sum over every query head of its group. Odd lengths leave ragged tiles."""
    first_candidate_only(torch.float32, 32)
    check_against_reference(2, 4, t_q, t_k, 32, causal, torch.float32, poisoned, kv_heads=kv_heads)


@needs_triton
@pytest.mark.parametrize(
    "t_q, lengths",
    [
        (1, [1, 66, 64]),  # batched decoding: a one-key row, full + edge key tiles, exactly one full tile
        (3, [70, 5, 63]),  # a chunk of three new tokens per row; 63: one key short of a tile
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ragged_rows(t_q, lengths, causal, poisoned, first_candidate_only):
    """Per-row lengths over a 70-key cache whose padding is NaN (never read): output and gradients
    against each row computed alone in float64, padding keys with zero gradients; grouped heads too."""
    first_candidate_only(torch.float32, 32)
    check_against_reference(3, 2, t_q, 70, 32, causal, torch.float32, poisoned, kv_heads=1, lengths=lengths)


@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ragged_rows_match_sdpa_attention(causal, first_candidate_only):
    """The kernel and the SDPA fallback agree on ragged grouped-query rows (visible_keys' masking)."""
    first_candidate_only(torch.float32, 32)
    q, k, v = (t.detach() for t in random_qkv(3, 4, 3, 20, 32, torch.float32, kv_heads=2))
    lengths = torch.tensor([20, 3, 11], device=DEVICE)
    got = flash_attention(q, k, v, causal=causal, lengths=lengths)
    want = fa.sdpa_attention(q, k, v, causal=causal, lengths=lengths)
    assert relative_error(got, want.double()) < 1e-5
    # Not a mask the kernel ignores: the same call without lengths differs.
    assert relative_error(flash_attention(q, k, v, causal=causal), want.double()) > 1e-2


@needs_triton
@gpu_only_long
@pytest.mark.parametrize(
    "t_q, t_k, head_dim, causal, dtype",
    [
        (1024, 1024, 64, True, torch.bfloat16),
        (8192, 8192, 128, True, torch.bfloat16),
        (8192, 8192, 64, False, torch.float16),
        (1, 8192, 128, True, torch.float16),
        (1500, 4099, 64, True, torch.bfloat16),
    ],
)
def test_long_sequences(t_q, t_k, head_dim, causal, dtype, poisoned, first_candidate_only):
    first_candidate_only(dtype, head_dim)
    check_against_reference(1, 2, t_q, t_k, head_dim, causal, dtype, poisoned)


@needs_triton
def test_poisoning_catches_an_unwritten_row(poisoned, monkeypatch, first_candidate_only):
    """A launcher that drops the last query tile must leave NaN rows, or the checks above prove nothing."""
    first_candidate_only(torch.float16, 64)
    monkeypatch.setattr(fa, "_cdiv", lambda a, b: max(-(-a // b) - 1, 1))
    q, k, v = random_qkv(1, 1, 130, 130, 64, torch.float16)
    out = flash_attention(q.detach(), k.detach(), v.detach())
    assert torch.isnan(out[0, 0, -1]).all()
    assert torch.isfinite(out[0, 0, 0]).all()


def _candidate_configs():
    """Every autotune candidate, with inputs of the case it serves (on CPU: fp32, small head dim)."""
    if fa._kernels is None:
        return []
    k = fa._kernels
    serves = {
        "head_dim<=64": (torch.bfloat16, 64),
        "head_dim=128": (torch.bfloat16, 128),
        "fp32": (torch.float32, 32),
    }
    cases = []
    for case, (dtype, head_dim) in serves.items():
        if not ON_CUDA:
            dtype, head_dim = torch.float32, 16
        for i, configs in enumerate(
            zip(k.FORWARD_CONFIGS[case], k.DKDV_CONFIGS[case], k.DQ_CONFIGS[case], strict=True)
        ):
            cases.append(pytest.param(configs, dtype, head_dim, id=f"{case}-{i}"))
    return cases


@needs_triton
@pytest.mark.parametrize("configs, dtype, head_dim", _candidate_configs())
def test_every_candidate_config(configs, dtype, head_dim, poisoned, monkeypatch):
    """Autotuning may pick any candidate, so each must be right: ragged tails, causal band, Tq < Tk."""
    k = fa._kernels
    kernels = (k._attention_forward, k._attention_backward_dkdv, k._attention_backward_dq)
    for kernel, config in zip(kernels, configs, strict=True):
        monkeypatch.setattr(kernel, "configs", [config])
    for t_q, t_k in ((150, 200), (130, 257)):  # Tk - Tq = 50, and 127 (one short of every tile size)
        check_against_reference(1, 1, t_q, t_k, head_dim, True, dtype, poisoned)


@needs_triton
def test_non_contiguous_inputs(poisoned, first_candidate_only):
    """Strided views need no copy: heads split out of a (B, T, H, D) projection, a slice of a wider tensor."""
    batch, heads, t, head_dim = 2, 3, 70, 64
    dtype = torch.float16
    first_candidate_only(dtype, head_dim)
    q = torch.randn(batch, t, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    k = torch.randn(batch, heads, t, 2 * head_dim, device=DEVICE).to(dtype)[..., :head_dim]
    v = torch.randn(batch, t, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    grad_out = torch.randn(batch, t, heads, head_dim, device=DEVICE).to(dtype).transpose(1, 2)
    assert not any(x.is_contiguous() for x in (q, k, v, grad_out))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    out = flash_attention(q, k, v, causal=True)
    got_grads = torch.autograd.grad(out, (q, k, v), grad_out)

    assert out.stride() == q.stride()  # the output keeps q's layout: merging heads back is free
    want_out, want_grads = reference_with_grads(q, k, v, grad_out, True)
    for name, got, want in (("out", out, want_out), *zip(("dq", "dk", "dv"), got_grads, want_grads, strict=True)):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) < TOLERANCE[dtype], name


@needs_triton
def test_trains_through_the_kernel(first_candidate_only):
    """Optimiser steps through the kernel follow the same trajectory as through the float64 reference:
    through .backward() and .grad (not only autograd.grad), step after step, the loss falling."""
    first_candidate_only(torch.float32, 32)
    start = [torch.randn(1, 2, 20, 32, device=DEVICE) for _ in range(3)]
    target = torch.randn(1, 2, 20, 32, device=DEVICE)

    def trajectory(attend, dtype):
        leaves = [t.clone().to(dtype).requires_grad_() for t in start]
        optimizer = torch.optim.SGD(leaves, lr=0.5)
        losses = []
        for _ in range(4):
            loss = (attend(*leaves) - target.to(dtype)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, leaves

    losses, leaves = trajectory(lambda q, k, v: flash_attention(q, k, v, causal=True), torch.float32)
    want_losses, want_leaves = trajectory(lambda q, k, v: reference_attention(q, k, v, True), torch.float64)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    for name, got, want in zip("qkv", leaves, want_leaves, strict=True):
        assert got.grad is not None and got.grad.dtype == torch.float32, name
        assert relative_error(got.detach(), want.detach()) < 1e-5, name
        assert relative_error(got.grad, want.grad) < 1e-4, name


# ----------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "q, k, v, causal, message",
    [
        (_t(2, 5, 16), _t(2, 5, 16), _t(2, 5, 16), False, "4-D"),
        (_t(1, 2, 5, 16), _t(1, 2, 5, 16), _t(1, 2, 6, 16), False, "same shape"),
        (_t(1, 2, 5, 16), _t(2, 2, 5, 16), _t(2, 2, 5, 16), False, "agree on batch and head_dim"),
        (_t(1, 2, 5, 32), _t(1, 2, 5, 16), _t(1, 2, 5, 16), False, "agree on batch and head_dim"),
        (_t(1, 2, 5, 16), _t(1, 3, 5, 16), _t(1, 3, 5, 16), False, "q has 2 heads, not a multiple of k/v's 3"),
        (_t(1, 6, 5, 16), _t(1, 4, 5, 16), _t(1, 4, 5, 16), False, "q has 6 heads, not a multiple of k/v's 4"),
        (_t(1, 2, 5, 16), _t(1, 2, 5, 16, dtype=torch.float16), _t(1, 2, 5, 16), False, "one dtype"),
        (*(_t(1, 2, 5, 16, dtype=torch.float64),) * 3, False, "float16, bfloat16 and float32"),
        (_t(1, 2, 5, 16), _t(1, 2, 5, 16, device="meta"), _t(1, 2, 5, 16), False, "one device"),
        (*(_t(1, 2, 5, 48),) * 3, False, r"head_dim 48 is not supported.*\(16, 32, 64, 128\)"),
        (_t(1, 2, 5, 16), _t(1, 2, 0, 16), _t(1, 2, 0, 16), False, "at least one key"),
        (_t(1, 2, 6, 16), _t(1, 2, 5, 16), _t(1, 2, 5, 16), True, "no more queries than keys"),
    ],
)
def test_rejects_bad_input(q, k, v, causal, message):
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, causal=causal)
    if fa._kernels is not None:
        with pytest.raises(ValueError, match=message):
            flash_attention(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "lengths, message",
    [
        (torch.tensor([5]), r"lengths must have shape \(batch,\) = \(2,\), got \(1,\)"),
        (torch.tensor([[5, 5]]), r"lengths must have shape \(batch,\) = \(2,\), got \(1, 2\)"),
        ([5, 5], r"lengths must have shape \(batch,\) = \(2,\), got list"),
        (torch.tensor([5, 5], dtype=torch.int32), "lengths must be int64, got torch.int32"),
        (torch.tensor([5, 5], device="meta"), "lengths must be on q's device cpu, got meta"),
        (torch.tensor([9, 2]), r"between the query count 3 and the key count 9, got values in \[2, 9\]"),
        (torch.tensor([10, 3]), r"between the query count 3 and the key count 9, got values in \[3, 10\]"),
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rejects_bad_lengths(lengths, message, causal):
    q, k = _t(2, 4, 3, 16), _t(2, 2, 9, 16)
    with pytest.raises(ValueError, match=message):
        attention(q, k, k, causal=causal, lengths=lengths)
    if fa._kernels is not None:
        with pytest.raises(ValueError, match=message):
            flash_attention(q, k, k, causal=causal, lengths=lengths)


# ----------------------------------------------------------------------------------------------------
# Dispatcher and fallback
# ----------------------------------------------------------------------------------------------------


def _kernel_log(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "anexa_kernels"]


@needs_triton
def test_dispatcher_runs_the_kernel_without_logging(monkeypatch, caplog, first_candidate_only):
    first_candidate_only(torch.float32, 32)
    monkeypatch.setattr(fa, "_fallback_logged", False)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: pytest.fail("fell back to SDPA"))
    q, k, v = (t.detach() for t in random_qkv(1, 2, 9, 33, 32, torch.float32))
    lengths = torch.tensor([20], device=DEVICE)
    with caplog.at_level(logging.DEBUG, logger="anexa_kernels"):
        out = attention(q, k, v, causal=True)
        ragged = attention(q, k[:, :1], v[:, :1], causal=True, lengths=lengths)  # grouped heads too
    assert _kernel_log(caplog) == []
    assert torch.equal(out, flash_attention(q, k, v, causal=True))
    assert torch.equal(ragged, flash_attention(q, k[:, :1], v[:, :1], causal=True, lengths=lengths))


def test_fallback_uses_sdpa_and_says_why_once(monkeypatch, caplog):
    """CPU tensors without the interpreter: SDPA with the same bottom-right mask, one log line per process."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fa, "_fallback_logged", False)
    monkeypatch.setattr(fa.FlashAttention, "apply", lambda *a: pytest.fail("ran the kernel"))
    q, k, v = (torch.randn(2, 3, t, 16) for t in (5, 9, 9))
    with caplog.at_level(logging.DEBUG, logger="anexa_kernels"):
        out = attention(q, k, v, causal=True)
        attention(q, k, v, causal=False)
        attention(k, k, v, causal=True)

    lines = _kernel_log(caplog)
    assert len(lines) == 1
    assert "fell back to torch scaled_dot_product_attention" in lines[0]
    assert ("TRITON_INTERPRET" in lines[0]) or ("triton is not importable" in lines[0])
    assert relative_error(out, reference_attention(q, k, v, causal=True)) < 1e-5


def test_fallback_passes_grouped_heads_and_lengths_to_sdpa(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fa, "_fallback_logged", True)
    monkeypatch.setattr(fa.FlashAttention, "apply", lambda *a: pytest.fail("ran the kernel"))
    q, k, v = (torch.randn(3, 4, 2, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16))
    lengths = torch.tensor([9, 2, 5])
    for causal in (False, True):
        out = attention(q, k, v, causal=causal, lengths=lengths)
        assert relative_error(out, reference_attention(q, k, v, causal, lengths=lengths)) < 1e-5


@pytest.mark.parametrize(
    "t_q, t_k",
    [
        (fa.CPU_FP32_MAX_KEYS, fa.CPU_FP32_MAX_KEYS),
        (3, fa.CPU_FP32_MAX_KEYS),
        (fa.CPU_FP32_MAX_KEYS + 1, fa.CPU_FP32_MAX_KEYS + 1),
    ],
)
def test_sdpa_in_bf16_with_grad_on_cpu_in_either_precision_matches_float64(t_q, t_k, monkeypatch):
    """Training in bf16 on CPU runs SDPA in float32 up to CPU_FP32_MAX_KEYS keys, in bf16 beyond, even under
    autocast (which would cast SDPA's inputs down again): both give the float64 reference's output and
    gradients, in bf16, within bf16's precision."""
    chosen, precisions = [], []
    real_choice, real_sdpa = fa._trains_in_float32, fa._sdpa
    monkeypatch.setattr(fa, "_trains_in_float32", lambda q, k: chosen.append(real_choice(q, k)) or chosen[-1])
    monkeypatch.setattr(fa, "_sdpa", lambda q, *rest: precisions.append(q.dtype) or real_sdpa(q, *rest))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, 32).bfloat16().requires_grad_() for t in (t_q, t_k, t_k))
    grad_out = torch.randn(2, 3, t_q, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fa.sdpa_attention(q, k, v, causal=True)
    out.backward(grad_out)
    want, want_grads = reference_with_grads(q, k, v, grad_out, causal=True)
    in_float32 = t_k <= fa.CPU_FP32_MAX_KEYS
    assert chosen == [in_float32]
    assert precisions == [torch.float32 if in_float32 else torch.bfloat16]
    assert out.dtype == q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    if in_float32:  # computed in float32 indeed, autocast notwithstanding: rounded to bf16 only at the end
        with torch.no_grad():
            assert torch.equal(out, real_sdpa(q.float(), k.float(), v.float(), True).bfloat16())
    assert relative_error(out, want) < 1e-2
    for got, expected in zip((q.grad, k.grad, v.grad), want_grads, strict=True):
        assert relative_error(got, expected) < 2e-2
    with torch.no_grad():
        assert not fa._trains_in_float32(q, k)  # inference keeps PyTorch's choice (bf16 flash is fast there)
    assert not fa._trains_in_float32(q.float(), k.float())


@pytest.mark.skipif(ON_CUDA, reason="the interpreter's bf16 limitation; on CUDA bf16 runs in the kernel")
def test_interpreter_sends_bf16_to_sdpa(monkeypatch, caplog):
    monkeypatch.setattr(fa, "_fallback_logged", False)
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with caplog.at_level(logging.DEBUG, logger="anexa_kernels"):
        out = attention(q, q, q, causal=True)
    assert out.dtype == torch.bfloat16
    if fa._kernels is not None:
        assert "bfloat16" in _kernel_log(caplog)[0]


def test_works_without_triton_installed(tmp_path):
    """A fresh interpreter where ``import triton`` fails: the package imports and attention falls back."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "import logging\n"
        "import torch\n"
        "logging.basicConfig(format='%(name)s: %(message)s')\n"
        "from anexa_kernels import attention, flash_attention\n"
        "q = torch.randn(1, 2, 4, 16)\n"
        "for _ in range(3):\n"
        "    out = attention(q, q, q, causal=True)\n"
        "print('shape', tuple(out.shape))\n"
        "try:\n"
        "    flash_attention(q, q, q)\n"
        "except RuntimeError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shape (1, 2, 4, 16)" in result.stdout
    assert "refused: flash_attention needs triton" in result.stdout
    fallback_lines = [line for line in result.stderr.splitlines() if line.startswith("anexa_kernels:")]
    assert len(fallback_lines) == 1 and "triton is not importable" in fallback_lines[0]


# ----------------------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------------------


def test_plugin_registers_triton_attention(first_candidate_only):
    from anexa_plugins import triton_attention

    first_candidate_only(torch.float32, 32)
    registered = {}
    triton_attention.register_attention(lambda name, obj: registered.setdefault(name, obj))
    triton_fn = registered["triton"]()  # the factory, with no options

    q, k, v = (torch.randn(1, 2, t, 32, device=DEVICE) for t in (3, 8, 8))
    got = triton_fn(q, k, v, causal=True)
    assert relative_error(got, reference_attention(q, k, v, causal=True)) < 1e-5

    assert triton_fn.grouped_query and triton_fn.ragged
    kv = torch.randn(2, 1, 8, 32, device=DEVICE)
    query = torch.randn(2, 2, 1, 32, device=DEVICE)
    lengths = torch.tensor([8, 3], device=DEVICE)
    got = triton_fn(query, kv, kv, causal=True, lengths=lengths)
    want = reference_attention(query, kv, kv, causal=True, lengths=lengths)
    assert relative_error(got, want) < 1e-5

    wide = torch.randn(1, 2, 3, 48, device=DEVICE)
    with pytest.raises(AnexaError, match="head_dim 48"):
        triton_fn(wide, wide, wide, causal=True)

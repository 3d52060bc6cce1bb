"""Attention forward and forward+backward per backend, B=4 H=4 D=64 fp32 causal, at two lengths."""

import pytest
import torch

BATCH, HEADS, HEAD_DIM = 4, 4, 64


def qkv(seq, requires_grad=False):
    return [torch.randn(BATCH, HEADS, seq, HEAD_DIM, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("seq", [128, 512])
def test_forward(benchmark, attention_fn, skip_if_fallback, seq):
    benchmark.group = f"attention forward T={seq}"
    q, k, v = qkv(seq)
    skip_if_fallback(q)
    with torch.no_grad():
        out = benchmark(attention_fn, q, k, v, causal=True)
    assert out.shape == q.shape


@pytest.mark.parametrize("seq", [128, 512])
def test_forward_backward(benchmark, attention_fn, skip_if_fallback, seq):
    benchmark.group = f"attention forward+backward T={seq}"
    q, k, v = qkv(seq, requires_grad=True)
    skip_if_fallback(q)
    grad_out = torch.randn_like(q)

    def forward_backward():
        return torch.autograd.grad(attention_fn(q, k, v, causal=True), (q, k, v), grad_out)

    grads = benchmark(forward_backward)
    assert all(torch.isfinite(g).all() for g in grads)

"""Forward and forward+backward time of PyTorch SDPA's flash and math backends on CPU, per dtype and length.

The measurement behind ``anexa_kernels.flash_attention.CPU_FP32_MAX_KEYS``: on CPU, the flash backend's
bf16 backward is slower than the math backend's for short sequences, and both are slower than casting
the bf16 inputs to float32 and running the float32 flash backend (the last column, casts included)
up to a few hundred keys; for long sequences bf16 flash is the fastest.

    .venv/bin/python benchmarks/sdpa_cpu_backends.py            # default threads
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sdpa_cpu_backends.py

Prints one line per shape and dtype: milliseconds (mean of 20 calls after 3 warm-up calls) for the
forward alone (no grad) and for forward + backward, causal, each backend forced with ``sdpa_kernel``.
"""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [
    (12, 4, 128, 32),
    (12, 8, 128, 16),
    (12, 4, 128, 64),
    (12, 4, 256, 32),
    (16, 6, 256, 64),
    (12, 4, 512, 32),
    (4, 8, 1024, 64),
]  # (B, H, T, D): the seed preset first, the small preset's (16, 6, 256, 64)


def mean_ms(fn, calls: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call, causal")
    print(
        f"{'B, H, T, D':>20} {'dtype':>9} {'flash fwd':>10} {'math fwd':>9} {'flash f+b':>10} {'math f+b':>9} {'fp32 f+b':>9}"
    )
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
            times = {}
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):

                def forward(backend=backend, q=q, k=k, v=v):
                    with torch.no_grad(), sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True)

                def forward_backward(backend=backend, q=q, k=k, v=v):
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    out.sum().backward()

                times[backend] = (mean_ms(forward), mean_ms(forward_backward))
            flash, math = times[SDPBackend.FLASH_ATTENTION], times[SDPBackend.MATH]

            def cast_up(q=q, k=k, v=v, dtype=dtype):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
                out.to(dtype).sum().backward()

            up = f"{mean_ms(cast_up):9.2f}" if dtype != torch.float32 else f"{'':>9}"
            print(
                f"{shape!s:>20} {str(dtype).removeprefix('torch.'):>9} {flash[0]:10.2f} {math[0]:9.2f} "
                f"{flash[1]:10.2f} {math[1]:9.2f} {up}"
            )


if __name__ == "__main__":
    main()

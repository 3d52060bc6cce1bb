"""Where and in what precision the model computes: the device, and bf16 autocast where it pays.

Training, generation, evaluation, the CLI and the server all choose through these functions.
"""

from __future__ import annotations

import contextlib

import torch

from anexa_core.errors import AnexaError


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else must be usable here.

    Raises :class:`AnexaError` for an unknown name or ``cuda`` without a visible GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AnexaError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnexaError("--device cuda but no CUDA GPU is visible: use --device cpu")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere autocast would emulate it."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """``precision`` (auto, fp32, bf16) on ``device`` → whether the step runs under bf16 autocast.

    ``auto`` picks bf16 on CUDA GPUs that support it and on CPUs with bf16 instructions (measured on this
    project's 2-core AVX512-BF16 CPU: 1.3× faster steps with the same loss curve, benchmarks/RESULTS.md).
    Weights, optimizer state, the loss and the norms stay float32 (PyTorch's autocast policy).
    """
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of ``precision`` on ``device`` (see :func:`uses_bf16`)."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decoding_autocast(device: torch.device):
    """Decoding's precision: bf16 on CUDA, float32 on a CPU (where bf16 would change greedy picks between
    the cached and the recomputed path, and one token at a time gains little from it)."""
    return autocast(device, "auto" if device.type == "cuda" else "fp32")

"""Attention plugin ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (the default).

The same function the ``triton`` plugin falls back to, so the two can never disagree on masking.
The ``backend`` option pins one of SDPA's backends (``-o attention.backend=flash``,
``anexa bench -a sdpa:backend=cudnn``); ``auto`` lets PyTorch pick, which is cuDNN attention on Hopper.
A pinned backend only chooses the kernel, never the result: where it cannot run (cuDNN on a CPU, flash
with a mask), PyTorch's choice runs instead, logged once with PyTorch's reason, as the ``triton``
plugin falls back to SDPA; ``fallback_reason`` lets ``anexa bench`` label such a row.
"""

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch.nn.attention import SDPBackend

from anexa_core import hookimpl
from anexa_kernels import sdpa_attention

logger = logging.getLogger("anexa")

Backend = Literal["auto", "flash", "efficient", "cudnn", "math"]
BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
NO_KERNEL = ("No available kernel", "No viable backend")
"""What PyTorch's ``RuntimeError`` says when the allowed backends cannot run the inputs (CUDA, CPU)."""


class Unavailable(RuntimeError):
    """The pinned backend cannot run these inputs; the message says why."""


@dataclass
class SDPA:
    """``F.scaled_dot_product_attention`` with a bottom-right causal mask; PyTorch picks the backend
    unless ``backend`` pins one. Grouped-query heads go to SDPA as they are (``enable_gqa``); per-row
    ``lengths`` become a mask (which the flash and cuDNN backends refuse)."""

    grouped_query: ClassVar[bool] = True
    ragged: ClassVar[bool] = True
    fallback_backend: ClassVar[str] = "sdpa (PyTorch's choice)"

    backend: Backend = field(
        default="auto",
        metadata={
            "help": "SDPA backend: auto (PyTorch picks), flash, efficient, cudnn or math; where the one "
            "pinned cannot run, PyTorch's choice runs (logged once)"
        },
    )
    _warned: bool = field(default=False, init=False, repr=False)

    def __call__(self, q, k, v, *, causal, lengths=None):
        if self.backend != "auto":
            try:
                return self._pinned(q, k, v, causal, lengths)
            except Unavailable as why:
                if not self._warned:
                    self._warned = True
                    logger.warning("%s: PyTorch's choice runs instead", why)
        return sdpa_attention(q, k, v, causal=causal, lengths=lengths)

    def fallback_reason(self, q):
        """Why the pinned backend would not run causal self-attention on ``q``; ``None`` when it would."""
        if self.backend == "auto":
            return None
        try:
            self._pinned(q, q, q, True, None)
        except Unavailable as why:
            return str(why)
        return None

    def _pinned(self, q, k, v, causal, lengths):
        """SDPA through the pinned backend alone; :class:`Unavailable` when PyTorch has no kernel for it."""
        # PyTorch explains a refusal in warnings, one per check: keep them for the message, off the console.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return sdpa_attention(q, k, v, causal=causal, lengths=lengths, backend=BACKENDS[self.backend])
            except RuntimeError as exc:
                if not any(text in str(exc) for text in NO_KERNEL):
                    raise  # a real failure (out of memory, a shape error) stays what it is
                messages = [str(warning.message) for warning in caught]
        raise Unavailable(self._unavailable(q, lengths, messages))

    def _unavailable(self, q, lengths, messages: list[str]) -> str:
        """Why the pinned backend refused: PyTorch's reasons for it, else where it was asked to run."""
        where = f"{q.device.type} {str(q.dtype).removeprefix('torch.')} D={q.shape[-1]}"
        if lengths is not None:
            where += " with a mask"
        why = _reasons(self.backend, messages)
        if why:
            detail = "; ".join(why)
        elif q.device.type == "cpu":
            detail = "PyTorch's CPU SDPA has only the flash and math backends"
        else:
            detail = f"PyTorch has no {self.backend} kernel for these inputs"
        return f"SDPA backend {self.backend} cannot run {where}: {detail}"


TRIGGERED = re.compile(r"\s*\(Triggered internally at [^)]*\)\.?")
HEADERS = {"flash": "flash attention", "efficient": "memory efficient", "cudnn": "cudnn attention", "math": "math"}


def _reasons(backend: str, messages: list[str]) -> list[str]:
    """The lines of PyTorch's "… kernel not used because:" warnings that are about ``backend``.

    PyTorch explains every backend it tried, each under a header line; the others' reasons (among them
    "has been runtime disabled", which pinning one backend causes) are left out.
    """
    lines = [TRIGGERED.sub("", line).strip() for message in messages for line in message.splitlines()]
    lines = [line for line in lines if line]
    if not any("not used because" in line for line in lines):
        return list(dict.fromkeys(lines))[:3]
    mine, current = [], None
    for line in lines:
        if "not used because" in line:
            current = line.lower().startswith(HEADERS[backend])
        elif current and "runtime disabled" not in line:
            mine.append(line)
    return list(dict.fromkeys(mine))[:3]


@hookimpl
def register_attention(register):
    register("sdpa", SDPA)

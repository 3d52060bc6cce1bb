"""Where and how the model computes: the device, bf16 autocast where it pays, and the CPU threads.

Training, generation, evaluation, the CLI and the server all choose through these functions. torch is
imported inside them, so :func:`configure_threads` can set OpenMP's environment before torch loads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from anexa_core.errors import AnexaError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("anexa")

THREADS_ENV = "ANEXA_THREADS"
"""Environment variable for the CPU thread count when no ``--threads`` (or ``threads`` key) is given."""

BUSY_SAMPLE_S = 0.25
"""How long :func:`busy_cores` watches the machine before choosing a thread count."""

TAKEN_SHARE = 0.25
"""A core is counted as taken by other work when that work keeps it this busy (a quarter) or more."""


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else must be usable here.

    Raises :class:`AnexaError` for an unknown name or ``cuda`` without a visible GPU."""
    import torch

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
    import torch

    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """``precision`` (auto, fp32, bf16) on ``device`` → whether the step runs under bf16 autocast.

    ``auto`` picks bf16 on CUDA GPUs that support it and on CPUs with bf16 instructions (measured on this
    project's 2-core AVX512-BF16 CPU: 1.3× faster steps with the same loss curve, benchmarks/RESULTS.md).
    Weights, optimizer state, the loss and the norms stay float32 (PyTorch's autocast policy).
    """
    import torch

    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of ``precision`` on ``device`` (see :func:`uses_bf16`)."""
    import torch

    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decoding_autocast(device: torch.device):
    """Decoding's precision: bf16 on CUDA, float32 on a CPU (where bf16 would change greedy picks between
    the cached and the recomputed path, and one token at a time gains little from it)."""
    return autocast(device, "auto" if device.type == "cuda" else "fp32")


# --- CPU threads ------------------------------------------------------------------------------------
#
# torch runs each operation on a team of OpenMP threads, one per core by default. On a machine where other
# work holds some of the cores, a team that size is a trap: every operation waits for its slowest
# thread, whose core it shares, and OpenMP's threads spin while they wait, taking the core from the work
# they wait for. Measured on 2 cores beside one busy process, 300 seed steps took 7× longer with the
# default two threads than with one (benchmarks/RESULTS.md, "CPU threads"). So Anexa picks the count
# itself, from the cores that are free when a command starts.

_auto_threads: int | None = None  # the automatic choice, made once per process


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, else v1's CFS files); ``None``
    when there is none or it cannot be read."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """``(busy, total)`` clock ticks of the CPUs ``cpus`` since boot, from Linux's /proc/stat; ``None``
    elsewhere. Busy is everything but idle and iowait."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        busy, total = busy + sum(ticks) - idle, total + sum(ticks)
    return (busy, total) if total else None


def busy_cores(interval_s: float = BUSY_SAMPLE_S) -> float:
    """How many of this process's usable cores other work kept busy over the next ``interval_s`` seconds
    (this process's own CPU time subtracted). 0.0 where the kernel does not tell (not Linux)."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:
        return 0.0
    first, own, started = _cpu_jiffies(cpus), _own_cpu_s(), time.monotonic()
    if first is None:
        return 0.0
    time.sleep(interval_s)
    second, own, elapsed = _cpu_jiffies(cpus), _own_cpu_s() - own, time.monotonic() - started
    if second is None or second[1] <= first[1]:
        return 0.0
    share = (second[0] - first[0]) / (second[1] - first[1])  # of all of ``cpus``' time, busy
    return max(0.0, share * len(cpus) - own / elapsed)


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def default_threads() -> int:
    """The thread count when none is given: the usable cores (:func:`usable_cores`) less those other work
    keeps busy right now (:func:`busy_cores`; a core counts as taken from a quarter busy on), at least 1;
    under ``torchrun``, that share of the cores each local rank gets."""
    cores = usable_cores()
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if ranks > 1:
        return max(1, cores // ranks)
    if cores == 1:
        return 1
    taken = max(0, math.ceil(busy_cores() - TAKEN_SHARE))
    return max(1, cores - taken)


def _from_environment() -> int | None:
    """``$ANEXA_THREADS``, else ``$OMP_NUM_THREADS`` (a user's standing choice), as a count; ``None`` when
    neither is set (or ``ANEXA_THREADS`` is 0: choose)."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            count = int(value.split(",")[0])  # OMP_NUM_THREADS may list one count per nesting level
        except ValueError:
            raise AnexaError(f"{name}={value!r} is not a number of threads: set it to an integer or unset it") from None
        if count < 0 or (count == 0 and name != THREADS_ENV):
            raise AnexaError(f"{name}={value!r} is not a number of threads: set it to 1 or more or unset it")
        return count or None
    return None


def resolve_threads(threads: int | None = None, default: int | None = None) -> tuple[int, str]:
    """The thread count to use and why: ``threads`` when it is 1 or more (``--threads``, the ``threads``
    setting), else ``$ANEXA_THREADS`` or ``$OMP_NUM_THREADS``, else ``default`` when given (a command's
    own default: the server's 1), else :func:`default_threads` (decided once per process). Raises
    :class:`AnexaError` for a negative count or an environment value that is none."""
    global _auto_threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise AnexaError(f"--threads must be 0 (choose) or a number of threads, got {threads!r}")
    if threads:
        return _at_most_enough(threads, "--threads"), "--threads"
    from_environment = _from_environment()
    if from_environment is not None:
        return _at_most_enough(from_environment, "the environment's thread count"), "the environment"
    if default:
        return default, "the command's default"
    if _auto_threads is None:
        _auto_threads = default_threads()
    return _auto_threads, "chosen"


def _at_most_enough(count: int, what: str) -> int:
    """``count``, or an :class:`AnexaError` when it is more than 4 threads per core of this machine (at
    least 64): more only wait on each other, and OpenMP crashed starting 100,000."""
    most = max(64, 4 * (os.cpu_count() or 1))
    if count > most:
        raise AnexaError(f"{what} asks for {count} CPU threads on {os.cpu_count()} cores: give at most {most}")
    return count


def configure_threads(threads: int | None = None, default: int | None = None) -> int:
    """Make torch compute with :func:`resolve_threads`'s count of CPU threads in this process; returns it.

    Before torch loads, this also sets OpenMP's environment, which torch's OpenMP runtime reads once as it
    starts: ``OMP_NUM_THREADS`` (threads started later, such as the server's workers, use the count too:
    ``torch.set_num_threads`` reaches only the calling thread's OpenMP team) and
    ``OMP_WAIT_POLICY=PASSIVE`` unless set (a waiting thread sleeps instead of spinning on a core other
    work needs). Every command that runs torch calls it first (``--threads``); ``train`` calls it with
    ``TrainConfig.threads``.
    """
    count, source = resolve_threads(threads, default)
    if "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(count)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    logger.debug("computing with %d CPU thread%s (%s)", count, "" if count == 1 else "s", source)
    return count

"""Triton FlashAttention-2 kernel vs PyTorch SDPA (flash backend) on one GPU: speed and memory.

Run by benchmarks/gpu_check.sh on an H100/H200; ``--dry-run`` prints the plan anywhere (no GPU needed).
A second table (:func:`variants`, alone with ``--variants``, left out with ``--no-variants``) compares the
Triton kernel with the three-pass backward, the Triton kernel with the fused one-pass backward
(``anexa_kernels.flash_attention_fused_backward``), and SDPA with its flash, cuDNN and default backends.
Timings are medians of ``triton.testing.do_bench`` after warm-up (autotuning and compiles happen in the
first, untimed call). FLOPs: forward ``4·B·H·T²·D`` (halved when causal), backward 2.5× the forward, so
forward+backward is 3.5× the forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpeedCase:
    batch: int
    heads: int
    t: int
    head_dim: int
    causal: bool
    dtype: str  # "bfloat16" or "float16"
    essential: bool = True  # optional rows are dropped once the time budget is spent

    @property
    def forward_flops(self) -> float:
        flops = 4.0 * self.batch * self.heads * self.t * self.t * self.head_dim
        return flops / 2 if self.causal else flops

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.dtype} {mask} B={self.batch} H={self.heads} T={self.t} D={self.head_dim}"


# Batch × heads fill the chip (256 / 128 (batch, head) programs per query tile) at T=4096; both head
# dims carry the same model width H·D = 2048 and the same FLOPs.
SPEED_CASES = [
    SpeedCase(8, 32, 4096, 64, True, "bfloat16"),
    SpeedCase(8, 16, 4096, 128, True, "bfloat16"),
    SpeedCase(8, 32, 4096, 64, False, "bfloat16", essential=False),
    SpeedCase(8, 32, 4096, 64, True, "float16", essential=False),
]
# Memory sweep: B·H·T fixed, so the inputs keep one size and any growth is the attention's own.
SWEEP_TOKENS = 16 * 16384
SWEEP_LENGTHS = [1024, 2048, 4096, 8192, 16384]
SWEEP_HEAD_DIM = 64
SWEEP_BATCH = 1
MATH_MAX_T = 4096  # the materialising reference needs B·H·T² scores: only short rows

# Variants table: causal bf16, B·H·T and the model width H·D fixed (the chip stays full, FLOPs grow with
# T). Ordered by importance: once the time budget is spent the later cases are skipped, not the first.
VARIANT_TOKENS = 8 * 16 * 4096
VARIANT_WIDTH = 2048
VARIANT_SHAPES = [(4096, 64), (4096, 128), (8192, 64), (8192, 128), (1024, 64), (1024, 128)]  # (T, D)
VARIANT_ESSENTIAL = 2  # the first cases run even past the budget
VARIANTS = [
    # (name, how it runs). SDPA's default backend first: the other rows are compared with it. Then the
    # fused backward, the one variant whose speed is unknown, before anything a time limit could cut.
    ("sdpa default", "F.scaled_dot_product_attention, no backend context (cuDNN on Hopper, torch 2.11)"),
    ("triton fused", "anexa_kernels forward + backward_fused: delta, one kernel with atomic dQ"),
    ("triton 3-pass", "anexa_kernels.flash_attention: forward + delta, dK/dV, dQ kernels"),
    ("sdpa cudnn", "sdpa_kernel(SDPBackend.CUDNN_ATTENTION)"),
    ("sdpa flash", "sdpa_kernel(SDPBackend.FLASH_ATTENTION)"),
]


def variant_cases() -> list[SpeedCase]:
    """The variants table's cases: causal bf16 with B·H·T = VARIANT_TOKENS and H·D = VARIANT_WIDTH."""
    cases = []
    for index, (t, head_dim) in enumerate(VARIANT_SHAPES):
        heads = VARIANT_WIDTH // head_dim
        batch = max(VARIANT_TOKENS // (heads * t), 1)
        cases.append(SpeedCase(batch, heads, t, head_dim, True, "bfloat16", essential=index < VARIANT_ESSENTIAL))
    return cases


def timed(fn, q, k, v, grad_out, causal: bool, backward: bool) -> float:
    """Median ms of ``fn(q, k, v, causal)`` (and its backward with ``grad_out``) by
    ``triton.testing.do_bench``; the first, untimed call compiles and autotunes."""
    import torch
    from triton.testing import do_bench

    def step():
        out = fn(q, k, v, causal)
        if backward:
            out.backward(grad_out)

    step()
    torch.cuda.synchronize()
    return do_bench(step, grad_to_none=[q, k, v], return_mode="median")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", ".")) / "gpu_table.md",
        help="markdown table to write (default: $OUT/gpu_table.md)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="skip the optional rows once this many seconds have passed (default 150)",
    )
    parser.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--variants: only the variants table (Triton 3-pass / fused backward, SDPA flash / cuDNN / "
        "default); --no-variants: leave it out; default: every table, the variants one last",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit; needs no GPU")
    return parser.parse_args(argv)


def dry_run(args: argparse.Namespace) -> None:
    import anexa_kernels  # noqa: F401  (the import itself is part of the check)

    print(f"would write {args.out}")
    if args.variants is not True:
        dry_run_main()
    if args.variants is not False:
        dry_run_variants(args)


def dry_run_main() -> None:
    for case in SPEED_CASES:
        print(
            f"speed  {case.label}: forward {case.forward_flops / 1e12:.2f} TFLOP"
            f"{'' if case.essential else '  (optional)'}"
        )
    for t in SWEEP_LENGTHS:
        heads = SWEEP_TOKENS // (SWEEP_BATCH * t)
        print(
            f"memory bf16 causal B={SWEEP_BATCH} H={heads} T={t} D={SWEEP_HEAD_DIM}"
            f"{'' if t <= MATH_MAX_T else ' (no math reference)'}"
        )


def dry_run_variants(args: argparse.Namespace) -> None:
    import anexa_kernels.flash_attention_fused_backward  # noqa: F401  (importable without a GPU)

    print(
        f"variants (budget {args.budget_s:.0f} s from the start; the first {VARIANT_ESSENTIAL} cases run regardless):"
    )
    for name, how in VARIANTS:
        print(f"  {name}: {how}")
    for case in variant_cases():
        print(
            f"variants {case.label}: forward {case.forward_flops / 1e12:.2f} TFLOP, "
            f"fwd+bwd {3.5 * case.forward_flops / 1e12:.2f}{'' if case.essential else '  (optional)'}"
        )


class Report:
    """Markdown rows kept in order and rewritten to disk after each one, so a cut-short run keeps its rows."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.lines = path, header

    def add(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return 0

    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from anexa_kernels import flash_attention

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --dry-run to check the plan)", file=sys.stderr)
        return 1
    started = time.time()
    kernels = sys.modules["anexa_kernels.flash_attention_kernels"]
    device = torch.cuda.get_device_name()
    if args.variants:
        report = Report(args.out, [f"# Attention variants on {device}", ""])
        variants(args, report, started)
        report.add()
        report.add(f"Total {time.time() - started:.0f} s including compiles and autotuning.")
        return 0
    report = Report(
        args.out,
        [
            f"# Triton attention vs SDPA (flash backend) on {device}",
            "",
            f"torch {torch.__version__}, triton {triton.__version__}. Median ms of `triton.testing.do_bench`. "
            "FLOPs: forward 4·B·H·T²·D (halved when causal), forward+backward 3.5× that. "
            "ratio = SDPA ms / Triton ms (above 1: Triton faster). "
            "rel err = ‖triton − sdpa‖/‖sdpa‖ of the forward output.",
            "",
            "| case | fwd ms triton | fwd ms sdpa | fwd TFLOP/s triton | fwd TFLOP/s sdpa | fwd ratio "
            "| fwd+bwd ms triton | fwd+bwd ms sdpa | fwd+bwd TFLOP/s triton | fwd+bwd TFLOP/s sdpa "
            "| fwd+bwd ratio "
            "| rel err | tuned configs (fwd / dkdv / dq) |",
            "|---|" + "---:|" * 11 + "---|",
        ],
    )

    def make_inputs(batch, heads, t, head_dim, dtype):
        shape = (batch, heads, t, head_dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        return q, k, v, torch.randn(shape, device="cuda", dtype=dtype)

    def sdpa(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def triton_attention(q, k, v, causal):
        return flash_attention(q, k, v, causal=causal)

    tuned_kernels = (kernels._attention_forward, kernels._attention_backward_dkdv, kernels._attention_backward_dq)

    def first_line(exc):
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:150]}"

    def best(kernel):
        config = getattr(kernel, "best_config", None)
        if config is None:
            return "?"
        blocks = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
        return f"{blocks} w{config.num_warps} s{config.num_stages}"

    for case in SPEED_CASES:
        if not case.essential and time.time() - started > args.budget_s:
            report.add(f"| {case.label} | skipped: time budget of {args.budget_s:.0f} s spent |" + " |" * 11)
            continue
        try:
            dtype = getattr(torch, case.dtype)
            q, k, v, grad_out = make_inputs(case.batch, case.heads, case.t, case.head_dim, dtype)
            with torch.no_grad():
                want = sdpa(q, k, v, case.causal).float()
                error = ((triton_attention(q, k, v, case.causal).float() - want).norm() / want.norm()).item()
            cells = []
            for backward, flops in ((False, case.forward_flops), (True, 3.5 * case.forward_flops)):
                ms_triton = timed(triton_attention, q, k, v, grad_out, case.causal, backward)
                ms_sdpa = timed(sdpa, q, k, v, grad_out, case.causal, backward)
                cells += [
                    f"{ms_triton:.3f}",
                    f"{ms_sdpa:.3f}",
                    f"{flops / ms_triton / 1e9:.0f}",
                    f"{flops / ms_sdpa / 1e9:.0f}",
                    f"{ms_sdpa / ms_triton:.2f}",
                ]
            tuned = " / ".join(best(kernel) for kernel in tuned_kernels)
            report.add(f"| {case.label} | " + " | ".join(cells) + f" | {error:.1e} | {tuned} |")
            del q, k, v, grad_out, want
        except Exception as exc:  # one failing row must not cost the others
            report.add(f"| {case.label} | FAILED: {first_line(exc)} |" + " |" * 11)
        torch.cuda.empty_cache()

    report.add()
    report.add(f"## Peak memory, forward+backward, bf16 causal D={SWEEP_HEAD_DIM}, B·H·T={SWEEP_TOKENS}")
    report.add()
    report.add(
        "Memory above the inputs (q, k, v, grad_out), from `torch.cuda.max_memory_allocated`. "
        "With B·H·T fixed, memory linear in T stays flat; "
        "the materialised T×T scores (math) grow with T."
    )
    report.add()
    report.add("| T | B×H | triton MiB | sdpa flash MiB | math MiB | triton fwd+bwd ms |")
    report.add("|---:|---:|---:|---:|---:|---:|")

    def math_attention(q, k, v, causal):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def peak_mib(fn, q, k, v, grad_out):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(q, k, v, True).backward(grad_out)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        q.grad = k.grad = v.grad = None
        return extra

    for t in SWEEP_LENGTHS:
        if t > 4096 and time.time() - started > args.budget_s + 60:
            report.add(f"| {t} | skipped: time budget spent | | | | |")
            continue
        heads = SWEEP_TOKENS // (SWEEP_BATCH * t)
        try:
            q, k, v, grad_out = make_inputs(SWEEP_BATCH, heads, t, SWEEP_HEAD_DIM, torch.bfloat16)
            triton_attention(q, k, v, True).backward(grad_out)  # compile/autotune before measuring memory
            q.grad = k.grad = v.grad = None
            mib_triton = peak_mib(triton_attention, q, k, v, grad_out)
            mib_sdpa = peak_mib(sdpa, q, k, v, grad_out)
            mib_math = f"{peak_mib(math_attention, q, k, v, grad_out):.0f}" if t <= MATH_MAX_T else "not run"
            ms = timed(triton_attention, q, k, v, grad_out, True, True)
            cells = [t, SWEEP_BATCH * heads, f"{mib_triton:.0f}", f"{mib_sdpa:.0f}", mib_math, f"{ms:.3f}"]
            report.add("| " + " | ".join(map(str, cells)) + " |")
            del q, k, v, grad_out
        except Exception as exc:
            report.add(f"| {t} | FAILED: {first_line(exc)} | | | | |")
        torch.cuda.empty_cache()

    if args.variants is None:
        report.add()
        variants(args, report, started)
    report.add()
    report.add(f"Total {time.time() - started:.0f} s including compiles and autotuning.")
    return 0


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:150]}".replace("|", "/")


def _fused_attention():
    """``fn(q, k, v, causal)``: the Triton forward with :func:`backward_fused` as its backward."""
    import importlib
    import math

    import torch

    from anexa_kernels.flash_attention_fused_backward import backward_fused

    # The module (the package's attribute of that name is the function).
    fa = importlib.import_module("anexa_kernels.flash_attention")

    class FusedBackwardAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal, sm_scale):
            out, lse = fa._forward(q, k, v, causal, sm_scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.causal, ctx.sm_scale = causal, sm_scale
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = backward_fused(grad_out, q, k, v, out, lse, ctx.causal, ctx.sm_scale)
            return dq, dk, dv, None, None

    def attention(q, k, v, causal):
        return FusedBackwardAttention.apply(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]))

    return attention


def _variant_functions() -> dict:
    """name → ``fn(q, k, v, causal)`` for every entry of :data:`VARIANTS`; a variant that cannot even be
    built (an import failing) maps to the exception, reported in its rows."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def attention(q, k, v, causal):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return attention

    def triton_three_pass():
        from anexa_kernels import flash_attention

        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)

    builders = {
        "sdpa default": lambda: sdpa_with(None),
        "sdpa cudnn": lambda: sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash": lambda: sdpa_with(SDPBackend.FLASH_ATTENTION),
        "triton 3-pass": triton_three_pass,
        "triton fused": _fused_attention,
    }
    functions: dict = {}
    for name, _ in VARIANTS:
        try:
            functions[name] = builders[name]()
        except Exception as exc:
            functions[name] = exc
    return functions


def _tuned(name: str) -> str:
    """The configs the autotuner picked for a Triton variant (after its first call)."""
    kernels = sys.modules.get("anexa_kernels.flash_attention_kernels")
    fused = sys.modules.get("anexa_kernels.flash_attention_fused_backward")

    def best(kernel):
        config = getattr(kernel, "best_config", None)
        if config is None:
            return "?"
        return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"

    try:
        if name == "triton 3-pass" and kernels is not None:
            return " / ".join(
                best(k)
                for k in (kernels._attention_forward, kernels._attention_backward_dkdv, kernels._attention_backward_dq)
            )
        if name == "triton fused" and kernels is not None and fused is not None:
            return f"{best(kernels._attention_forward)} / {best(fused._attention_backward_fused)}"
    except Exception as exc:
        return _first_line(exc)
    return ""


def variants(args: argparse.Namespace, report: Report, started: float) -> None:
    """Time forward and forward+backward of every :data:`VARIANTS` entry on every :func:`variant_cases`
    case and add one row per (case, variant) to ``report``. A variant that fails to build, compile or
    run gets a row with its error; a case is skipped once ``args.budget_s`` seconds have passed since
    ``started`` (except the first :data:`VARIANT_ESSENTIAL`), with a row saying so."""
    import torch

    columns = 12
    report.add("## Attention variants, causal bf16: Triton 3-pass vs fused backward, SDPA backends")
    report.add()
    report.add(
        f"B·H·T = {VARIANT_TOKENS}, H·D = {VARIANT_WIDTH}. Median ms of `triton.testing.do_bench` "
        "(inputs require grad; compiles and autotuning happen in an untimed first call). "
        "FLOPs: forward 4·B·H·T²·D/2 (causal); fwd+bwd counted as 3.5× the forward for every variant, "
        "as in the Triton-vs-SDPA table (the backward's conventional 2.5×; the 3-pass backward executes 3.5×, "
        "so its real rate is higher). ratio = sdpa default ms / variant ms (above 1: faster than "
        "default SDPA). rel err = ‖x − x_default‖/‖x_default‖ against SDPA's default backend on the "
        "same inputs. tuned: forward / dK,dV / dQ configs (3-pass) or forward / fused configs, BLOCK_MxBLOCK_N."
    )
    report.add()
    report.add(
        "| case | variant | fwd ms | fwd TFLOP/s | fwd ratio | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd ratio "
        "| rel err out | rel err dq | rel err dk | rel err dv | tuned |"
    )
    report.add("|---|---|" + "---:|" * (columns - 2) + "---|")
    functions = _variant_functions()

    def relative(got, want):
        return f"{((got.float() - want).norm() / want.norm()).item():.1e}" if want is not None else "n/a"

    for case in variant_cases():
        if not case.essential and time.time() - started > args.budget_s:
            names = ", ".join(name for name, _ in VARIANTS)
            report.add(
                f"| {case.label} | skipped ({names}): time budget of {args.budget_s:.0f} s spent |"
                + " |" * (columns - 1)
            )
            continue
        try:
            shape = (case.batch, case.heads, case.t, case.head_dim)
            q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            grad_out = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        except Exception as exc:
            report.add(f"| {case.label} | inputs FAILED: {_first_line(exc)} |" + " |" * (columns - 1))
            continue
        reference: list = [None] * 4
        default_ms: list = [None, None]
        for name, _ in VARIANTS:
            fn = functions[name]
            try:
                if isinstance(fn, Exception):
                    raise fn
                out = fn(q, k, v, True)
                grads = torch.autograd.grad(out, (q, k, v), grad_out)
                results = [out.detach(), *grads]
                del out, grads
                if name == "sdpa default":
                    reference = [r.float() for r in results]
                errors = [relative(r, want) for r, want in zip(results, reference, strict=True)]
                del results
                cells = []
                for index, (backward, flops) in enumerate(
                    ((False, case.forward_flops), (True, 3.5 * case.forward_flops))
                ):
                    ms = timed(fn, q, k, v, grad_out, True, backward)
                    if name == "sdpa default":
                        default_ms[index] = ms
                    ratio = f"{default_ms[index] / ms:.2f}" if default_ms[index] else "n/a"
                    cells += [f"{ms:.3f}", f"{flops / ms / 1e9:.0f}", ratio]
                report.add(f"| {case.label} | {name} | " + " | ".join(cells + errors) + f" | {_tuned(name)} |")
            except Exception as exc:  # one failing variant must not cost the others
                report.add(f"| {case.label} | {name} | FAILED: {_first_line(exc)} |" + " |" * (columns - 2))
            q.grad = k.grad = v.grad = None
            torch.cuda.empty_cache()
        del q, k, v, grad_out, reference
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())

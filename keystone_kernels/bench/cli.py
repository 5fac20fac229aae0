"""The ``keystone-kernels bench`` command: argument parsing only."""

from __future__ import annotations

import time

import torch

from .report import report
from .run import Plan, bench_backends, make_plan, rerender, run
from .shapes import SHAPES


def parse_fractions(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        if not 0 < value <= 1:
            raise ValueError(f"keystone fraction {part!r} must be in (0, 1] (or a percentage like 0.1%)")
        out.append(float(f"{value:.10g}"))  # 0.1% -> exactly 1e-3, so that it matches the default cases
    return out


def parse_train_steps(text: str, plan: Plan) -> list[tuple[str, int, int, list[tuple[float, str]]]]:
    """``SHAPE:BATCHxSEQ[,...]`` as ``Plan.train`` entries, one case each: 0.1% (else the plan's first
    fraction) with the default backend. Lets a short GPU check time one train step of a shape that
    the other parts do not use (``--shapes`` names the shapes of every part)."""
    fraction = 1e-3 if 1e-3 in plan.fractions else plan.fractions[0]
    steps = []
    for part in text.split(","):
        name, _, size = part.strip().partition(":")
        batch, _, seq = size.lower().partition("x")
        if name not in SHAPES or not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 0):
            raise ValueError(f"--train-steps {part.strip()!r}: expected SHAPE:BATCHxSEQ, e.g. llama-3.2-1b:1x512, "
                             f"with SHAPE one of {', '.join(SHAPES)}")
        steps.append((name, int(batch), int(seq), [(fraction, plan.default_backend)]))
    return steps


def parse_ranks(text: str) -> tuple[int, ...]:
    """``--lora-ranks``: comma-separated positive integers, or ``none``."""
    if text.strip().lower() in ("", "none"):
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--lora-ranks {text!r}: expected comma-separated positive integers, e.g. 8,16,64, or none")
    return tuple(int(p) for p in parts)


def cmd_bench(args) -> int:
    if args.report:
        results = rerender(args.report)
        print(report(results))
        print(f"\nwrote {', '.join(results['files'].values())}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    plan = make_plan(device, args.quick, backends=args.backends.split(",") if args.backends else None,
                     shapes=args.shapes.split(",") if args.shapes else None,
                     fractions=parse_fractions(args.fractions) if args.fractions else None,
                     parts=args.parts.split(",") if args.parts else None, budget_gb=args.mem_budget_gb)
    if args.train_steps:
        plan.train = parse_train_steps(args.train_steps, plan)
        # LoRA / Liger rows beside explicit train steps only when asked for (gpu_check.sh times one step)
        plan.baseline_steps = tuple((s, b, q) for s, b, q, _ in plan.train) if args.lora_ranks or args.liger else ()
    if args.lora_ranks is not None:
        plan.lora_ranks = parse_ranks(args.lora_ranks)
    plan.train_compiled = args.train_compiled
    if args.train_deadline is not None:
        if args.train_deadline <= 0:
            raise ValueError(f"--train-deadline {args.train_deadline:g}: expected a positive number of seconds")
        plan.train_deadline_s = args.train_deadline
    if args.liger:
        if device.type != "cuda":
            raise ValueError("--liger: Liger-Kernel runs Triton GPU kernels; use it with --device cuda")
        plan.liger = True
    available = bench_backends(device)
    missing = [b for b in plan.backends if b not in available]
    if missing:
        raise RuntimeError(f"backends {missing} cannot run on {device.type} here "
                           f"(available: {', '.join(available) or 'none'})")
    start = time.perf_counter()
    results = run(plan, args.out, file_stem=args.name)
    print()
    print(report(results))
    print(f"\nwrote {', '.join(results['files'].values())} in {time.perf_counter() - start:.0f} s")
    return 0


def add_bench_command(sub) -> None:
    """Register ``keystone-kernels bench`` on the CLI's sub-parsers."""
    p = sub.add_parser("bench", help="speed and memory against dense AdamW, as ratios (JSON + plot)",
                       description="Optimizer step, weight gradient and full train step of keystone training against "
                                   "dense torch AdamW on real model shapes (random weights), with peak memory.")
    p.add_argument("--quick", action="store_true", help="SmolLM2-135M shapes only, few repetitions (minutes on a CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--out", default="bench-out", help="folder for the JSON and the plot (default ./bench-out)")
    p.add_argument("--backends", help="comma-separated keystone backends (default: every one that runs on the device)")
    p.add_argument("--shapes", help="comma-separated model shapes (default: quick or full set; "
                                    f"known: {', '.join(SHAPES)})")
    p.add_argument("--fractions", help="comma-separated keystone fractions of neurons, e.g. 0.1%%,1%% "
                                       "(default 0.01%%,0.1%%,1%%,5%%)")
    p.add_argument("--parts", help="comma-separated subset of host,optimizer,wgrad,train (default all)")
    p.add_argument("--train-steps", metavar="SHAPE:BxS[,...]",
                   help="train steps to run instead of the default ones, e.g. llama-3.2-1b:1x512 (each one row: "
                        "0.1%% or else the first of --fractions, with the default backend); independent of --shapes")
    p.add_argument("--report", metavar="JSON", help="measure nothing: recompute the summary of a results JSON and "
                                                     "rewrite its tables (.md) and plot (.png) beside it")
    p.add_argument("--lora-ranks", metavar="R[,R...]",
                   help="PEFT LoRA rows (on q, k, v, o, gate, up, down) beside the SmolLM2 4x128 (CPU) / Llama-3.2-1B "
                        "4x2048 (CUDA) train step, or beside every --train-steps step; 'none' for none "
                        "(default: 16 with --quick, else 8,16,64; none with --train-steps)")
    p.add_argument("--liger", action="store_true",
                   help="CUDA: also time keystone and LoRA r=16 with Liger-Kernel's Llama kernels (untested; needs "
                        "liger-kernel)")
    p.add_argument("--train-compiled", action="store_true",
                   help="every side at its best too: dense, dense in pure bf16, keystone and the first LoRA rank "
                        "under torch.compile (inductor), beside their eager rows; the first step (compile) is "
                        "timed apart")
    p.add_argument("--train-deadline", type=float, metavar="SECONDS",
                   help="seconds the train part may take: rows that would start later are noted, not run, and "
                        "no row runs past it (the GPU check fits its budget with it)")
    p.add_argument("--name", help="file stem of the results (default bench_<device>[_quick])")
    p.add_argument("--mem-budget-gb", type=float,
                   help="memory the optimizer benchmark may use (default: CPU min(6, 40%% of "
                        "available) GiB, CUDA 40%% of free)")
    p.set_defaults(func=cmd_bench)

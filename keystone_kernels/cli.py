"""Command line: ``keystone-kernels <command>`` (also ``python -m keystone_kernels``).

Commands: ``find`` (discover and write a mask), ``verify`` (collapse vs random table), ``sft``
(fine-tune), ``compare`` (keystone vs random vs LoRA vs full), ``demo`` (the whole story on the
default model), ``bench`` (speed and memory against dense AdamW and LoRA), ``multigpu`` (communication
and memory figures). This module only parses arguments; :mod:`keystone_kernels.commands` runs them.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import commands, sft_config
from .bench import add_bench_command
from .multigpu import add_multigpu_command
from .utils.dist import is_distributed


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="local folder or cached HF id; 'default' = SmolLM2-135M-Instruct (default)")
    p.add_argument("--dtype", default="float32", choices=sorted(commands.DTYPES), help="model dtype (default float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when present)")


def _add_find_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts",
                   help="JSON file {group: [prompt, ...]} (default: the shipped math / code / knowledge / "
                        "multilingual groups)")
    p.add_argument("--top-fraction", type=float, default=0.01, help="fraction each group selects (default 0.01)")
    p.add_argument("--selection", default="per_layer", choices=["per_layer", "global_per_type", "global"])
    p.add_argument("--positions", default="last", choices=["last", "all", "generate"],
                   help="last prompt token, every prompt token, or generate: the paper's protocol, the model's own "
                        "greedy answer recorded token by token (default last)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="--positions generate: at most N new tokens per prompt (default 256; the paper used 16000)")
    p.add_argument("--types", default=None,
                   help="comma-separated neuron types or 'paper', 'residual', 'all' (default: paper)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the chat template (default: auto, on for --positions generate when the "
                        "tokenizer has one)")
    p.add_argument("--group-pool", default="tokens", choices=["tokens", "prompts"],
                   help="tokens: one mean per group; prompts: each prompt selects, the group intersects (the paper)")
    p.add_argument("--rounding", default="floor", choices=["floor", "ceil", "paper"],
                   help="neurons per fraction: int(n f), ceil(n f), or paper (ceil for --selection global)")
    p.add_argument("--batch-size", type=int, default=8)


def _add_sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="arith-train", help="training file (JSONL/JSON/CSV/Parquet) or a shipped set: "
                   "arith-train (default), multistep-train")
    p.add_argument("--eval", default=None,
                   help="eval file with prompt/answer (default: the shipped eval set of --data)")
    p.add_argument("--mask", help="mask JSON (default: find one with --top-fraction)")
    p.add_argument("--top-fraction", type=float, default=None,
                   help="fraction for find_keystone when no --mask (default 0.01)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--lora-r", type=int, default=16,
                   help="mode lora: LoRA rank on q, k, v, o, gate, up, down (alpha = 2 r; needs peft) (default 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keystone-kernels",
                                     description="Find, verify and fine-tune the keystone neurons of an LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("find", help="find keystone neurons and write the mask JSON")
    _add_model_args(p)
    _add_find_args(p)
    p.add_argument("--out", default="keystone_mask.json", help="where to write the mask (default keystone_mask.json)")
    p.add_argument("--paper-compatible", action="store_true",
                   help="write the paper's layout (all six types, no other key; its train.py loads it) and the "
                        "metadata beside it in OUT's .meta.json")
    p.set_defaults(func=commands.cmd_find)

    p = sub.add_parser("verify", help="perplexity: base vs keystone-ablated vs random-ablated")
    _add_model_args(p)
    _add_find_args(p)
    p.add_argument("--mask", help="mask JSON (default: find one first with the options above)")
    p.add_argument("--texts", help="text file, one passage per line (default: shipped held-out English)")
    p.add_argument("--seeds", type=int, default=3, help="number of random masks (default 3)")
    p.add_argument("--factor", type=float, default=0.0, help="scale factor for the masked weights (default 0: ablate)")
    p.add_argument("--random-match", default="weights", choices=["weights", "neurons"],
                   help="random masks keep the rows / columns per projection (weights, default: the fair control) or "
                        "only the neuron counts")
    p.set_defaults(func=commands.cmd_verify)

    p = sub.add_parser("sft", help="supervised fine-tuning: keystone-only, random mask, or full")
    _add_model_args(p)
    _add_sft_args(p)
    p.add_argument("--mode", default="keystone", choices=list(sft_config.MODES),
                   help="random: a random mask with as many neurons and trainable weights per projection as the "
                        "keystone one; lora: PEFT LoRA (rank --lora-r) on the seven decoder projections, torch AdamW; "
                        "paper: the recipe the paper's code runs (keystone rows / columns plus gate_proj, norms, "
                        "embeddings, lm_head and biases), with its controls paper-without-keystone and paper-random")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per mode, see README)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (default: 0.01 in the paper modes, else 0)")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="warm-up fraction of the steps (default: 0.03 in the paper modes, else 0.1)")
    p.add_argument("--schedule", default=None, choices=list(sft_config.SCHEDULES),
                   help="learning-rate schedule after warm-up (default: linear in the paper modes, else cosine)")
    p.add_argument("--output", required=True, help="output folder (adapter, checkpoints, metrics.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT from its newest checkpoint that loads; a setting (lr, seed, "
                        "batch size, mask, data, ...) other than the run's is an error that lists the differences")
    p.add_argument("--merge", action="store_true", help="also write the merged plain model to OUTPUT/merged")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor) and, in the keystone modes, the optimizer step's device "
                        "work (KeystoneAdamW(capturable=True, compile_step=True)); the first steps take longer while "
                        "it compiles. Non-finite steps are then skipped and counted instead of raised")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a collective may wait for another rank before this one fails "
                        "(default: torch's, 30 min for gloo, 10 min for NCCL)")
    p.set_defaults(func=commands.cmd_sft)

    p = sub.add_parser("compare", help="keystone vs random vs LoRA vs full over a learning-rate grid, same budget")
    _add_model_args(p)
    _add_sft_args(p)
    p.add_argument("--lrs-keystone", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--lrs-random", type=float, nargs="*", default=[1e-3, 3e-3])
    p.add_argument("--lrs-lora", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3],
                   help="PEFT LoRA (rank --lora-r) learning rates; none to leave LoRA out (needs peft)")
    p.add_argument("--lrs-full", type=float, nargs="*", default=[1e-5, 3e-5, 1e-4])
    for mode in sft_config.PAPER_MODES:
        p.add_argument(f"--lrs-{mode}", type=float, nargs="*", default=[],
                       help=f"{mode}: learning rates (default: none, the mode is left out)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train every (mode, lr) with seeds 0..N-1 and report the mean and spread (default 1)")
    p.add_argument("--eval-items", type=int, default=100)
    p.add_argument("--output", default="compare_out")
    p.set_defaults(func=commands.cmd_compare)

    p = sub.add_parser("demo", help="the whole story on the default model: find, prove, fine-tune, compare")
    _add_model_args(p)
    _add_sft_args(p)
    p.set_defaults(steps=80)
    p.add_argument("--eval-items", type=int, default=100)
    p.add_argument("--output", default="keystone_demo")
    p.set_defaults(func=commands.cmd_demo)

    add_bench_command(sub)
    add_multigpu_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, ImportError) as err:
        print(f"keystone-kernels {args.command}: error: {err}", file=sys.stderr)
        if is_distributed():
            # A peer died or hangs: tearing the process group down at interpreter exit would block or abort
            # (gloo: "terminate called without an active exception", exit -6), so leave now, with our code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())

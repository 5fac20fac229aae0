"""Command line: ``keystone-kernels <command>`` (also ``python -m keystone_kernels``).

Commands: ``find`` (discover and write a mask), ``verify`` (collapse vs random table), ``bench``
(speed and memory against dense AdamW).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="local folder or cached HF id; 'default' = SmolLM2-135M-Instruct (default)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="model dtype (default float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda when present)")


def _add_find_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", help="JSON file {group: [prompt, ...]} (default: the shipped math/code/knowledge/multilingual groups)")
    p.add_argument("--top-fraction", type=float, default=0.01, help="fraction each group selects (default 0.01)")
    p.add_argument("--selection", default="per_layer", choices=["per_layer", "global_per_type", "global"])
    p.add_argument("--positions", default="last", choices=["last", "all"])
    p.add_argument("--types", default=None, help="comma-separated neuron types or 'paper', 'residual', 'all' (default: paper)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--batch-size", type=int, default=8)


def _load(args):
    from .models import load_model

    return load_model(args.model, dtype=_DTYPES[args.dtype], device=args.device)


def _find(args, model, tokenizer):
    from .discovery import find_keystone

    prompts = None
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = json.load(f)
    types = args.types.split(",") if args.types else None
    return find_keystone(
        model, tokenizer, prompts, top_fraction=args.top_fraction, selection=args.selection,
        positions=args.positions, types=types, chat=args.chat, batch_size=args.batch_size,
    )


def summary_table(found) -> str:
    """Neurons per layer (rows) and type (columns), then the IoU of the groups."""
    from .verify import format_table

    mask = found.mask
    types = list(mask.metadata.get("types") or sorted(mask.counts_by_type()))
    per_layer: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (ntype, layer, _), idx in mask.neurons.items():
        per_layer[layer][ntype] += len(idx)
    rows = [[layer] + [per_layer[layer][t] for t in types] + [sum(per_layer[layer].values())] for layer in sorted(per_layer)]
    totals = mask.counts_by_type()
    rows.append(["all"] + [totals.get(t, 0) for t in types] + [mask.num_neurons])
    lines = [format_table(["layer"] + types + ["total"], rows), ""]
    lines.append(f"keystone neurons: {mask.num_neurons} of {found.total_neurons} ({100 * found.fraction:.3f}%)")
    lines.append(f"IoU over all groups: {found.iou:.3f}")
    lines += [f"  IoU {pair}: {v:.3f}" for pair, v in found.pairwise_iou.items()]
    return "\n".join(lines)


def cmd_find(args) -> int:
    model, tokenizer = _load(args)
    found = _find(args, model, tokenizer)
    found.mask.to_json(args.out)
    print(summary_table(found))
    print(f"mask written to {args.out}")
    return 0


def cmd_verify(args) -> int:
    from .mask import KeystoneMask
    from .verify import collapse_table, format_table

    model, tokenizer = _load(args)
    if args.mask:
        mask = KeystoneMask.from_json(args.mask)
        mask.validate(model)
    else:
        found = _find(args, model, tokenizer)
        mask = found.mask
        print(summary_table(found), end="\n\n")
    texts = None
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    rows = collapse_table(model, tokenizer, mask, texts, seeds=range(args.seeds), factor=args.factor)
    print(format_table(["condition", "neurons", "perplexity", "x base"], [(r.condition, r.neurons, r.perplexity, r.ratio) for r in rows]))
    return 0


def _data_path(value: str) -> str:
    from .tasks import SHIPPED, shipped_path

    return str(shipped_path(value)) if value in SHIPPED else value


def _add_sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="arith-train", help="training file (JSONL/JSON/CSV/Parquet) or a shipped set: "
                   "arith-train (default), multistep-train")
    p.add_argument("--eval", default=None, help="eval file with prompt/answer (default: the shipped eval set of --data)")
    p.add_argument("--mask", help="mask JSON (default: find one with --top-fraction)")
    p.add_argument("--top-fraction", type=float, default=0.01, help="fraction for find_keystone when no --mask (default 0.01)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")


def _eval_items(args) -> list[dict]:
    from .tasks import read_jsonl

    path = args.eval
    if path is None:
        path = args.data.replace("-train", "-eval") if args.data.endswith("-train") else None
    if path is None:
        return []
    items = read_jsonl(_data_path(path))
    return [{"prompt": r.get("prompt"), "answer": r.get("answer", r.get("response"))} for r in items]


def cmd_sft(args) -> int:
    from . import sft
    from .mask import KeystoneMask
    from .sft_data import load_sft_dataset
    from .verify import format_table

    model, tokenizer = _load(args)
    config = sft.SFTConfig(mode=args.mode, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, seed=args.seed, backend=args.backend,
                           eval_every=args.eval_every, save_every=args.save_every)
    dataset = load_sft_dataset(_data_path(args.data), tokenizer, max_length=args.max_length)
    items = _eval_items(args)
    mask = None
    resuming = args.resume and (Path(args.output) / "checkpoint" / "state.json").is_file()
    if args.mode != "full" and not resuming:
        if args.mask:
            mask = KeystoneMask.from_json(args.mask)
        else:
            from .discovery import find_keystone

            mask = find_keystone(model, tokenizer, top_fraction=args.top_fraction, progress=False).mask
    before = sft.evaluate(model, tokenizer, items) if items and not args.no_eval else None
    result = sft.train(model, tokenizer, mask, dataset, config, args.output, resume=args.resume)
    after = sft.evaluate(model, tokenizer, items) if items and not args.no_eval else None
    metrics = {"mode": args.mode, "lr": config.learning_rate, "steps": args.steps, "batch_size": args.batch_size,
               "trainable_parameters": result.trainable_parameters, "optimizer_state_bytes": result.optimizer_state_bytes,
               "median_step_seconds": result.median_step_seconds, "tokens": result.tokens, "losses": result.losses,
               "before": before, "after": after}
    sft.write_metrics(Path(args.output) / "metrics.json", metrics)
    sft.finish(model, args.output, args.merge)
    if before and after:
        print(format_table(["metric", "before", "after"], [(k, before[k], after[k]) for k in before]))
    print(f"mode {args.mode}, lr {config.learning_rate:g}: {result.trainable_parameters} trainable parameters, "
          f"median step {result.median_step_seconds:.2f} s; outputs in {args.output}")
    return 0


def _sft_inputs(args, model, tokenizer, mask=None):
    """(training set, eval items, mask): the mask is ``mask``, else --mask, else found with --top-fraction."""
    from .discovery import find_keystone
    from .mask import KeystoneMask
    from .sft_data import load_sft_dataset

    dataset = load_sft_dataset(_data_path(args.data), tokenizer, max_length=args.max_length)
    items = _eval_items(args)[: args.eval_items]
    if not items:
        raise ValueError("comparisons need an eval set with prompt/answer rows (--eval)")
    if mask is None:
        mask = KeystoneMask.from_json(args.mask) if args.mask else find_keystone(model, tokenizer, top_fraction=args.top_fraction,
                                                                                    progress=False).mask
    return dataset, items, mask


def cmd_compare(args) -> int:
    from .compare import sweep

    model, tokenizer = _load(args)
    dataset, items, mask = _sft_inputs(args, model, tokenizer)
    grid = {"keystone": args.lrs_keystone, "random": args.lrs_random, "full": args.lrs_full}
    grid = {m: lrs for m, lrs in grid.items() if lrs}
    report = sweep(model, tokenizer, mask, dataset, items, grid, args.steps, args.batch_size, args.output, args.seed)
    print(report["text"])
    print(f"written: {args.output}/compare.json, compare.md, tradeoff.png ({report['seconds'] / 60:.1f} min)")
    return 0


def cmd_demo(args) -> int:
    import time

    from . import compare
    from .discovery import find_keystone
    from .verify import collapse_table, format_table

    t0 = time.time()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load(args)
    print("== 1. find keystone neurons (shipped math / code / knowledge / multilingual prompts)")
    found = find_keystone(model, tokenizer, top_fraction=args.top_fraction, progress=False)
    found.mask.to_json(out / "keystone_mask.json")
    print(summary_table(found).split("\n\n")[-1])
    print("\n== 2. proof: zero them vs zero random neurons of the same layout")
    rows = collapse_table(model, tokenizer, found.mask, seeds=range(3))
    print(format_table(["condition", "neurons", "perplexity", "x base"], [(r.condition, r.neurons, r.perplexity, r.ratio) for r in rows]))
    print(f"\n== 3. fine-tune on {args.data}: keystone-only vs full, same budget ({args.steps} steps x {args.batch_size})")
    from .sft import evaluate, write_metrics

    dataset, items, _ = _sft_inputs(args, model, tokenizer, found.mask)
    base = evaluate(model, tokenizer, items)
    runs = [compare.run_one(model, tokenizer, found.mask, dataset, items, mode, None, args.steps, args.batch_size, args.seed)
            for mode in ("keystone", "full")]
    print()
    print(format_table(
        ["", "target acc", "ppl (English)", "QA acc", "trainable params", "optimizer state", "s/step"],
        [("base", base["accuracy"], base["perplexity"], base["qa_accuracy"], "-", "-", "-")]
        + [(f"{r.mode} (lr {r.lr:g})", r.accuracy, r.perplexity, r.qa_accuracy, f"{r.trainable_parameters:,}",
            f"{r.optimizer_state_bytes / 2**20:.2f} MiB", f"{r.median_step_seconds:.2f}") for r in runs]))
    compare.plot_losses({f"{r.mode} (lr {r.lr:g})": r.losses for r in runs}, out / "loss_curves.png")
    sft_report = {"base": base, "runs": [r.__dict__ for r in runs], "collapse": [r.__dict__ for r in rows]}
    write_metrics(out / "demo.json", sft_report)
    print(f"\nloss curves: {out / 'loss_curves.png'}; all figures: {out / 'demo.json'}; {(time.time() - t0) / 60:.1f} min")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keystone-kernels", description="Find, verify and fine-tune the keystone neurons of an LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("find", help="find keystone neurons and write the mask JSON")
    _add_model_args(p)
    _add_find_args(p)
    p.add_argument("--out", default="keystone_mask.json", help="where to write the mask (default keystone_mask.json)")
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("verify", help="perplexity: base vs keystone-ablated vs random-ablated")
    _add_model_args(p)
    _add_find_args(p)
    p.add_argument("--mask", help="mask JSON (default: find one first with the options above)")
    p.add_argument("--texts", help="text file, one passage per line (default: shipped held-out English)")
    p.add_argument("--seeds", type=int, default=3, help="number of random masks (default 3)")
    p.add_argument("--factor", type=float, default=0.0, help="scale factor for the masked weights (default 0: ablate)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("sft", help="supervised fine-tuning: keystone-only, random mask, or full")
    _add_model_args(p)
    _add_sft_args(p)
    p.add_argument("--mode", default="keystone", choices=["keystone", "random", "full"])
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per mode, see README)")
    p.add_argument("--output", required=True, help="output folder (adapter, checkpoints, metrics.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--merge", action="store_true", help="also write the merged plain model to OUTPUT/merged")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("compare", help="keystone vs random vs full over a learning-rate grid, same budget")
    _add_model_args(p)
    _add_sft_args(p)
    p.add_argument("--lrs-keystone", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--lrs-random", type=float, nargs="*", default=[1e-3, 3e-3])
    p.add_argument("--lrs-full", type=float, nargs="*", default=[1e-5, 3e-5, 1e-4])
    p.add_argument("--eval-items", type=int, default=100)
    p.add_argument("--output", default="compare_out")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the whole story on the default model: find, prove, fine-tune, compare")
    _add_model_args(p)
    _add_sft_args(p)
    p.set_defaults(steps=80)
    p.add_argument("--eval-items", type=int, default=100)
    p.add_argument("--output", default="keystone_demo")
    p.set_defaults(func=cmd_demo)

    from .bench import add_bench_command

    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"keystone-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

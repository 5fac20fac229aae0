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
    p.add_argument("--positions", default="last", choices=["last", "all", "generate"],
                   help="last prompt token, every prompt token, or generate: the paper's protocol, the model's own "
                        "greedy answer recorded token by token (default last)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="--positions generate: at most N new tokens per prompt (default 256; the paper used 16000)")
    p.add_argument("--types", default=None, help="comma-separated neuron types or 'paper', 'residual', 'all' (default: paper)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the chat template (default: auto, on for --positions generate when the "
                        "tokenizer has one)")
    p.add_argument("--group-pool", default="tokens", choices=["tokens", "prompts"],
                   help="tokens: one mean per group; prompts: each prompt selects, the group intersects (the paper)")
    p.add_argument("--rounding", default="floor", choices=["floor", "ceil", "paper"],
                   help="neurons per fraction: int(n f), ceil(n f), or paper (ceil for --selection global)")
    p.add_argument("--batch-size", type=int, default=8)


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise RuntimeError(f"--device {device}: CUDA is not available ({why}); use --device cpu, or install a CUDA "
                           "build of torch on a machine with a GPU")


def _load(args):
    from .models import load_model

    _check_device(args.device)
    return load_model(args.model, dtype=_DTYPES[args.dtype], device=args.device)


def _find(args, model, tokenizer):
    from .discovery import find_keystone

    prompts = None
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            try:
                prompts = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{args.prompts}: not valid JSON ({err}); prompts are {{group: [prompt, ...]}}") from None
    types = args.types.split(",") if args.types else None
    return find_keystone(
        model, tokenizer, prompts, top_fraction=args.top_fraction, selection=args.selection,
        positions=args.positions, types=types, chat=args.chat, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, group_pool=args.group_pool, rounding=args.rounding,
    )


def _pair_range(pairwise: dict[str, float]) -> str:
    return f"{min(pairwise.values()):.2f}-{max(pairwise.values()):.2f}" if pairwise else "-"


def summary_table(found) -> str:
    """Neurons per layer (rows) and type (columns) with each layer's IoU, then the groups' overlap:
    IoU, overlap-vs-single and pairwise IoU, overall and per type."""
    from .tables import format_table

    mask, ov = found.mask, found.overlap
    types = list(mask.metadata.get("types") or sorted(mask.counts_by_type()))
    per_layer: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (ntype, layer, _), idx in mask.neurons.items():
        per_layer[layer][ntype] += len(idx)
    layers = sorted(set(per_layer) | (set(ov.by_layer) if ov else set()))
    rows = [[layer] + [per_layer[layer][t] for t in types] + [sum(per_layer[layer].values())]
            + ([f"{ov.by_layer[layer].iou:.2f}" if layer in ov.by_layer else "-"] if ov else []) for layer in layers]
    totals = mask.counts_by_type()
    rows.append(["all"] + [totals.get(t, 0) for t in types] + [mask.num_neurons] + ([f"{ov.iou:.2f}"] if ov else []))
    lines = [format_table(["layer"] + types + ["total"] + (["IoU"] if ov else []), rows), ""]
    lines.append(f"keystone neurons: {mask.num_neurons} of {found.total_neurons} ({100 * found.fraction:.3f}%)")
    vs_single = f", overlap vs single: {ov.overlap_vs_single:.3f}" if ov else ""
    lines.append(f"IoU over all groups: {found.iou:.3f}{vs_single}")
    lines += [f"  IoU {pair}: {v:.3f}" for pair, v in found.pairwise_iou.items()]
    if ov:
        order = [t for t in types if t in ov.by_type] + [t for t in ov.by_type if t not in types]
        by_type = [(t, r.intersection, r.union, f"{r.iou:.3f}", f"{r.overlap_vs_single:.3f}",
                    _pair_range(r.pairwise_iou)) for t, r in ((t, ov.by_type[t]) for t in order)]
        by_type.append(("all", ov.total.intersection, ov.total.union, f"{ov.iou:.3f}", f"{ov.overlap_vs_single:.3f}",
                        _pair_range(ov.pairwise_iou)))
        lines.append(format_table(["type", "intersection", "union", "IoU", "vs single", "pairwise IoU"], by_type))
    if found.recorded_tokens:
        lines.append("recorded tokens per group: " + ", ".join(f"{g} {n}" for g, n in found.recorded_tokens.items()))
    return "\n".join(lines)


def _collapse_text(rows) -> str:
    from .tables import format_table

    return format_table(["condition", "neurons", "weights", "perplexity", "x base"],
                        [(r.condition, r.neurons, r.weights, r.perplexity, r.ratio) for r in rows])


def cmd_find(args) -> int:
    model, tokenizer = _load(args)
    found = _find(args, model, tokenizer)
    found.mask.to_json(args.out, paper_compatible=args.paper_compatible)
    print(summary_table(found))
    if args.paper_compatible:
        from .mask import sidecar_path

        print(f"mask written to {args.out} (the paper's layout; metadata in {sidecar_path(args.out)})")
    else:
        print(f"mask written to {args.out}")
    return 0


def cmd_verify(args) -> int:
    from .mask import KeystoneMask
    from .verify import collapse_table

    model, tokenizer = _load(args)
    if args.mask:
        mask = KeystoneMask.from_json(args.mask)
        mask.validate(model)
        meta = mask.metadata
        if "iou" in meta:
            vs_single = f", overlap vs single {meta['overlap_vs_single']:.3f}" if "overlap_vs_single" in meta else ""
            print(f"mask of {mask.num_neurons} neurons; when found: IoU over all groups {meta['iou']:.3f}{vs_single}\n")
    else:
        found = _find(args, model, tokenizer)
        mask = found.mask
        print(summary_table(found), end="\n\n")
    texts = None
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    rows = collapse_table(model, tokenizer, mask, texts, seeds=range(args.seeds), factor=args.factor,
                          match=args.random_match)
    print(_collapse_text(rows))
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
    p.add_argument("--lora-r", type=int, default=16,
                   help="mode lora: LoRA rank on q, k, v, o, gate, up, down (alpha = 2 r; needs peft) (default 16)")


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
    """Under ``torchrun`` every rank runs this: data is sharded per rank, all ranks take rank 0's mask, rank 0 writes."""
    from . import distributed, sft
    from .mask import KeystoneMask
    from .sft_data import load_sft_dataset
    from .tables import format_table

    args.device = str(distributed.init_from_env(args.dist_timeout, args.device))  # joins torchrun's group, if any
    main = distributed.is_main_process()
    model, tokenizer = _load(args)
    config = sft.SFTConfig(mode=args.mode, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, seed=args.seed, backend=args.backend,
                           eval_every=args.eval_every, save_every=args.save_every, lora_r=args.lora_r)
    dataset = load_sft_dataset(_data_path(args.data), tokenizer, max_length=args.max_length)
    items = _eval_items(args)
    mask = None
    resuming = args.resume and sft.latest_checkpoint(args.output) is not None
    if args.mode not in ("full", "lora") and not resuming:
        if args.mask:
            mask = KeystoneMask.from_json(args.mask)
        else:
            from .discovery import find_keystone

            # every rank finds it (no rank idles in a collective meanwhile), then all take rank 0's
            mask = find_keystone(model, tokenizer, top_fraction=args.top_fraction, progress=False).mask
            mask = KeystoneMask.from_dict(distributed.broadcast_object(mask.to_dict()))
    before = sft.evaluate(model, tokenizer, items) if items and not args.no_eval else None
    try:
        result = sft.train(model, tokenizer, mask, dataset, config, args.output, resume=args.resume, progress=main)
    except RuntimeError as err:
        if not distributed.is_distributed():
            raise
        raise RuntimeError(
            f"rank {distributed.rank()}: {err}\nIn a run of several processes this means another rank died, or hung "
            f"for longer than --dist-timeout ({args.dist_timeout or 'torch default'} s). The last checkpoint is in "
            f"{Path(args.output) / 'checkpoint'}: start the job again with --resume") from err
    if not main:
        return 0  # rank 0 evaluates and writes metrics, the merged model and the summary
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
    grid = {"keystone": args.lrs_keystone, "random": args.lrs_random, "lora": args.lrs_lora, "full": args.lrs_full}
    grid = {m: lrs for m, lrs in grid.items() if lrs}
    if "lora" in grid:  # fail before the other runs, not after them
        from .lora import require_peft

        require_peft()
    report = sweep(model, tokenizer, mask, dataset, items, grid, args.steps, args.batch_size, args.output, args.seed,
                   lora_r=args.lora_r)
    print(report["text"])
    print(f"written: {args.output}/compare.json, compare.md, tradeoff.png ({report['seconds'] / 60:.1f} min)")
    return 0


def cmd_demo(args) -> int:
    import time

    from . import compare
    from .discovery import find_keystone
    from .tables import format_table
    from .verify import collapse_table

    t0 = time.time()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load(args)
    print("== 1. find keystone neurons (shipped math / code / knowledge / multilingual prompts)")
    found = find_keystone(model, tokenizer, top_fraction=args.top_fraction, progress=False)
    found.mask.to_json(out / "keystone_mask.json")
    print(summary_table(found).split("\n\n")[-1])
    print("\n== 2. proof: zero them vs zero random masks with as many neurons and weights per projection")
    rows = collapse_table(model, tokenizer, found.mask, seeds=range(3))
    print(_collapse_text(rows))
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
    p.add_argument("--paper-compatible", action="store_true",
                   help="write the paper's layout (all six types, no other key; its train.py loads it) and the "
                        "metadata beside it in OUT's .meta.json")
    p.set_defaults(func=cmd_find)

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
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("sft", help="supervised fine-tuning: keystone-only, random mask, or full")
    _add_model_args(p)
    _add_sft_args(p)
    p.add_argument("--mode", default="keystone", choices=["keystone", "random", "lora", "full"],
                   help="random: a random mask with as many neurons and trainable weights per projection as the "
                        "keystone one; lora: PEFT LoRA (rank --lora-r) on the seven decoder projections, torch AdamW")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per mode, see README)")
    p.add_argument("--output", required=True, help="output folder (adapter, checkpoints, metrics.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--merge", action="store_true", help="also write the merged plain model to OUTPUT/merged")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a collective may wait for another rank before this one fails "
                        "(default: torch's, 30 min for gloo, 10 min for NCCL)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("compare", help="keystone vs random vs LoRA vs full over a learning-rate grid, same budget")
    _add_model_args(p)
    _add_sft_args(p)
    p.add_argument("--lrs-keystone", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--lrs-random", type=float, nargs="*", default=[1e-3, 3e-3])
    p.add_argument("--lrs-lora", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3],
                   help="PEFT LoRA (rank --lora-r) learning rates; none to leave LoRA out (needs peft)")
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
    from .multigpu import add_multigpu_command

    add_multigpu_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, ImportError) as err:
        print(f"keystone-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

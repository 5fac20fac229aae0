"""Command line: ``keystone-kernels <command>`` (also ``python -m keystone_kernels``).

Commands: ``find`` (discover and write a mask), ``verify`` (collapse vs random table), ``bench``
(speed and memory against dense AdamW).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

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

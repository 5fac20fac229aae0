"""The README's discovery table: how the recording protocol changes the keystone mask.

On the default model (SmolLM2-135M-Instruct), shipped prompt groups, ``per_layer`` selection at 1%:
for positions last / all / generate, each with the chat template off and on (and the paper's whole
protocol: generate + chat + ``group_pool="prompts"``), find the mask, then ablate it and 3 fair
random masks (``random_like(match="weights")``). Every row is also one CLI command::

    keystone-kernels verify --positions generate --chat --max-new-tokens 256 --seeds 3

Run (from the repository root): ``.venv/bin/python bench/discovery_protocols.py``; writes
``bench/results/discovery_protocols_cpu.json`` and ``.md``. About 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from keystone_kernels import KeystoneMask, collapse_table, default_prompts, find_keystone, load_default_model
from keystone_kernels.analysis import overlap
from keystone_kernels.analysis.discovery import record, select_top

SETTINGS = [("last", False, "tokens"), ("last", True, "tokens"), ("all", False, "tokens"), ("all", True, "tokens"),
            ("generate", False, "tokens"), ("generate", True, "tokens"), ("generate", True, "prompts")]


def _command(positions: str, chat: bool, pool: str, max_new: int) -> str:
    cmd = f"keystone-kernels verify --positions {positions} --{'chat' if chat else 'no-chat'}"
    if positions == "generate":
        cmd += f" --max-new-tokens {max_new}"
    if pool != "tokens":
        cmd += f" --group-pool {pool}"
    return cmd + " --seeds 3"


def run(max_new_tokens: int, seeds: int) -> list[dict]:
    model, tok = load_default_model()
    rows = []
    for positions, chat, pool in SETTINGS:
        t0 = time.perf_counter()
        found = find_keystone(model, tok, top_fraction=0.01, selection="per_layer", positions=positions, chat=chat,
                              group_pool=pool, max_new_tokens=max_new_tokens, progress=True)
        t_find = time.perf_counter() - t0
        table = collapse_table(model, tok, found.mask, seeds=range(seeds))
        ov = found.overlap
        prompts = sum(found.mask.metadata["groups"].values())
        row = {
            "positions": positions, "chat": chat, "group_pool": pool,
            "command": _command(positions, chat, pool, max_new_tokens),
            "neurons": found.mask.num_neurons, "total_neurons": found.total_neurons, "fraction": found.fraction,
            "iou": ov.iou, "overlap_vs_single": ov.overlap_vs_single,
            "pairwise_iou": ov.pairwise_iou, "by_type": {t: r.to_dict() for t, r in ov.by_type.items()},
            "tokens_per_prompt": sum(found.recorded_tokens.values()) / prompts,
            "base_ppl": table[0].perplexity, "keystone_ratio": table[1].ratio, "keystone_weights": table[1].weights,
            "random_ratios": [r.ratio for r in table[2:]], "random_weights": [r.weights for r in table[2:]],
            "find_seconds": t_find, "seconds": time.perf_counter() - t0,
        }
        if found.responses:
            row["example_response"] = {g: r[0] for g, r in found.responses.items()}
        print(json.dumps({k: v for k, v in row.items() if k not in ("by_type", "example_response")}), flush=True)
        rows.append(row)
    row = paper_setting(model, tok, max_new_tokens, seeds)
    print(json.dumps({k: v for k, v in row.items() if k != "by_type"}), flush=True)
    rows.append(row)
    return rows


def paper_setting(model, tok, max_new_tokens: int, seeds: int) -> dict:
    """The paper's own setting: one prompt per domain (4 prompts: prompt i of each shipped group), each
    prompt its own selection, the 4 intersected. The shipped groups give 10 such sets (i = 0..9); the
    row shows the median set (IoU, overlap vs single) and ablates the set of prompts i = 0."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    prompts = default_prompts()
    with tqdm(desc="Generating (greedy) for recording", unit="tok") as bar:
        recs = {g: record(model, tok, ps, positions="generate", max_new_tokens=max_new_tokens, progress=bar)
                for g, ps in prompts.items()}
    per = {g: r.per_prompt() for g, r in recs.items()}
    sets = []
    for i in range(min(len(ps) for ps in prompts.values())):
        masks = {g: KeystoneMask(select_top({k: v[i] for k, v in per[g].items()}, 0.01)) for g in prompts}
        keystone = list(masks.values())[0]
        for m in list(masks.values())[1:]:
            keystone = keystone & m
        sets.append((overlap(masks), keystone))
    table = collapse_table(model, tok, sets[0][1], seeds=range(seeds))
    total = sum(v.shape[1] for v in next(iter(per.values())).values())
    ious, vs_single = sorted(ov.iou for ov, _ in sets), sorted(ov.overlap_vs_single for ov, _ in sets)
    tokens = [t for r in recs.values() for t in r.tokens]
    return {
        "positions": "generate", "chat": True, "group_pool": "1 prompt per group",
        "command": "python bench/discovery_protocols.py (function paper_setting)",
        "neurons": sets[0][1].num_neurons, "neurons_all_sets": [k.num_neurons for _, k in sets],
        "total_neurons": total, "fraction": sets[0][1].num_neurons / total,
        "iou": ious[len(ious) // 2], "iou_all_sets": [ov.iou for ov, _ in sets],
        "overlap_vs_single": vs_single[len(vs_single) // 2],
        "overlap_vs_single_all_sets": [ov.overlap_vs_single for ov, _ in sets],
        "pairwise_iou": {f"{p} (set {i})": v for i, (ov, _) in enumerate(sets) for p, v in ov.pairwise_iou.items()},
        "by_type": {t: r.to_dict() for t, r in sets[0][0].by_type.items()},
        "tokens_per_prompt": sum(tokens) / len(tokens),
        "base_ppl": table[0].perplexity, "keystone_ratio": table[1].ratio, "keystone_weights": table[1].weights,
        "random_ratios": [r.ratio for r in table[2:]], "random_weights": [r.weights for r in table[2:]],
        "seconds": time.perf_counter() - t0,
    }


def markdown(rows: list[dict]) -> str:
    header = ("| positions | chat | group pool | neurons | IoU | overlap vs single | pairwise IoU | tokens / prompt "
              "| keystone ablated | 3 random (same weights) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pw = r["pairwise_iou"].values()
        iou, vs = f"{r['iou']:.3f}", f"{r['overlap_vs_single']:.3f}"
        if "iou_all_sets" in r:  # the paper's setting: median of the 4-prompt sets, then their range
            iou += f" ({min(r['iou_all_sets']):.2f}-{max(r['iou_all_sets']):.2f})"
            vs += f" ({min(r['overlap_vs_single_all_sets']):.2f}-{max(r['overlap_vs_single_all_sets']):.2f})"
        lines.append(f"| {r['positions']} | {'on' if r['chat'] else 'off'} | {r['group_pool']} | {r['neurons']} "
                     f"({100 * r['fraction']:.2f}%) | {iou} | {vs} | "
                     f"{min(pw):.2f}-{max(pw):.2f} | {r['tokens_per_prompt']:.1f} | x{r['keystone_ratio']:.4g} | "
                     + " / ".join(f"x{x:.3g}" for x in r["random_ratios"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/discovery_protocols_cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is much faster than 2 on a CPU shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = run(args.max_new_tokens, args.seeds)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "minutes": (time.time() - t0) / 60,
               "note": "2-core CPU shared with other jobs: the seconds are indicative only"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "max_new_tokens": args.max_new_tokens, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = markdown(rows)
    commands = "\n".join(f"    {r['command']}" for r in rows)
    out.with_suffix(".md").write_text(f"{text}\n\nCommands (one per row):\n\n{commands}\n")
    print(text)


if __name__ == "__main__":
    main()

"""What each ``keystone-kernels`` command does with its parsed arguments (``cli.py`` parses them).

Every ``cmd_*`` takes the ``argparse.Namespace`` of its sub-command and returns the exit status.
Nothing heavy is imported here: transformers (seconds) is imported where a model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import sft
from .analysis.discovery import find_keystone
from .analysis.verify import collapse_table
from .compare import sweep
from .demo import run_demo
from .mask import KeystoneMask, sidecar_path
from .models import load_model
from .reports import collapse_summary, discovery_summary
from .sft_data import load_sft_dataset
from .sft_modes import mode_of
from .tasks import eval_items, resolve_data
from .utils.dist import broadcast_object, init_from_env, is_distributed, is_main_process, rank
from .utils.io import ensure_writable_dir
from .utils.peft import require_peft
from .utils.tables import format_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise RuntimeError(f"--device {device}: CUDA is not available ({why}); use --device cpu, or install a CUDA "
                           "build of torch on a machine with a GPU")


def _load(args):
    _check_device(args.device)
    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)


def _read_prompts(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); prompts are {{group: [prompt, ...]}}") from None


def _find(args, model, tokenizer):
    prompts = _read_prompts(args.prompts) if args.prompts else None
    types = args.types.split(",") if args.types else None
    return find_keystone(
        model, tokenizer, prompts, top_fraction=args.top_fraction, selection=args.selection,
        positions=args.positions, types=types, chat=args.chat, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, group_pool=args.group_pool, rounding=args.rounding,
    )


DEFAULT_TOP_FRACTION = 0.01  # sft / compare / demo without --mask and --top-fraction


def _top_fraction(args) -> float:
    return DEFAULT_TOP_FRACTION if args.top_fraction is None else args.top_fraction


def _mask_or_find(args, model, tokenizer):
    """--mask when given, else a mask found with --top-fraction."""
    if args.mask:
        return KeystoneMask.from_json(args.mask)
    return find_keystone(model, tokenizer, top_fraction=_top_fraction(args), progress=False).mask


def _dataset(args, model, tokenizer):
    return load_sft_dataset(resolve_data(args.data), tokenizer, max_length=sft.fit_to_context(args.max_length, model))


def cmd_find(args) -> int:
    model, tokenizer = _load(args)
    found = _find(args, model, tokenizer)
    found.mask.to_json(args.out, paper_compatible=args.paper_compatible)
    print(discovery_summary(found))
    if args.paper_compatible:
        print(f"mask written to {args.out} (the paper's layout; metadata in {sidecar_path(args.out)})")
    else:
        print(f"mask written to {args.out}")
    return 0


def cmd_verify(args) -> int:
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
        print(discovery_summary(found), end="\n\n")
    texts = None
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    rows = collapse_table(model, tokenizer, mask, texts, seeds=range(args.seeds), factor=args.factor,
                          match=args.random_match)
    print(collapse_summary(rows))
    return 0


def cmd_sft(args) -> int:
    """Under ``torchrun`` every rank runs this: data is sharded per rank, all ranks take rank 0's mask,
    rank 0 writes."""
    args.device = str(init_from_env(args.dist_timeout, args.device))  # joins torchrun's group, if any
    main = is_main_process()
    if main:
        ensure_writable_dir(args.output, "--output")  # before the minutes of loading and training, not after
    model, tokenizer = _load(args)
    config = sft.SFTConfig(mode=args.mode, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, seed=args.seed, backend=args.backend,
                           eval_every=args.eval_every, save_every=args.save_every, lora_r=args.lora_r,
                           weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, schedule=args.schedule,
                           compile=args.compile)
    dataset = _dataset(args, model, tokenizer)
    items = eval_items(args.data, args.eval)
    mask, origin = None, {}
    if mode_of(args.mode).needs_mask:
        if args.mask is None and (not args.resume or args.top_fraction is not None):
            origin["top_fraction"] = _top_fraction(args)  # a resume compares it with the run's
        if args.resume and sft.latest_checkpoint(args.output) is not None:
            mask = KeystoneMask.from_json(args.mask) if args.mask else None  # None: the checkpoint's own
        else:
            # every rank finds it (no rank idles in a collective meanwhile), then all take rank 0's
            mask = KeystoneMask.from_dict(broadcast_object(_mask_or_find(args, model, tokenizer).to_dict()))
    before = sft.evaluate(model, tokenizer, items) if items and not args.no_eval else None
    try:
        result = sft.train(model, tokenizer, mask, dataset, config, args.output, resume=args.resume, progress=main,
                           origin=origin)
    except RuntimeError as err:
        if not is_distributed():
            raise
        raise RuntimeError(
            f"rank {rank()}: {err}\nIn a run of several processes this means another rank died, or hung "
            f"for longer than --dist-timeout ({args.dist_timeout or 'torch default'} s). The last checkpoint is in "
            f"{Path(args.output) / 'checkpoints'}: start the job again with --resume") from err
    if not main:
        return 0  # rank 0 evaluates and writes metrics, the merged model and the summary
    after = sft.evaluate(model, tokenizer, items) if items and not args.no_eval else None
    metrics = {"mode": args.mode, "lr": config.learning_rate, "steps": args.steps, "batch_size": args.batch_size,
               "trainable_parameters": result.trainable_parameters,
               "optimizer_state_bytes": result.optimizer_state_bytes, "skipped_steps": result.skipped_steps,
               "median_step_seconds": result.median_step_seconds, "tokens": result.tokens, "losses": result.losses,
               "before": before, "after": after}
    sft.write_metrics(Path(args.output) / "metrics.json", metrics)
    sft.finish(model, args.output, args.merge, args.mode)
    if before and after:
        print(format_table(["metric", "before", "after"], [(k, before[k], after[k]) for k in before]))
    print(f"mode {args.mode}, lr {config.learning_rate:g}: {result.trainable_parameters} trainable parameters, "
          f"median step {result.median_step_seconds:.2f} s; outputs in {args.output}")
    return 0


def cmd_compare(args) -> int:
    ensure_writable_dir(args.output, "--output")
    model, tokenizer = _load(args)
    dataset = _dataset(args, model, tokenizer)
    items = eval_items(args.data, args.eval)[: args.eval_items]
    if not items:
        raise ValueError("comparisons need an eval set with prompt/answer rows (--eval)")
    mask = _mask_or_find(args, model, tokenizer)
    grid = {"keystone": args.lrs_keystone, "random": args.lrs_random, "lora": args.lrs_lora, "full": args.lrs_full}
    grid |= {m: getattr(args, f"lrs_{m.replace('-', '_')}") for m in sft.PAPER_MODES}
    grid = {m: lrs for m, lrs in grid.items() if lrs}
    if "lora" in grid:  # fail before the other runs, not after them
        require_peft()
    report = sweep(model, tokenizer, mask, dataset, items, grid, args.steps, args.batch_size, args.output,
                   seeds=range(args.seed, args.seed + args.seeds), lora_r=args.lora_r)
    print(report["text"])
    print(f"written: {args.output}/compare.json, compare.md, tradeoff.png ({report['seconds'] / 60:.1f} min)")
    return 0


def cmd_demo(args) -> int:
    ensure_writable_dir(args.output, "--output")
    model, tokenizer = _load(args)
    run_demo(model, tokenizer, args.output, data=args.data, eval_path=args.eval, steps=args.steps,
             batch_size=args.batch_size, seed=args.seed, top_fraction=_top_fraction(args),
             max_length=args.max_length, max_eval_items=args.eval_items)
    return 0

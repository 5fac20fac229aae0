"""Supervised fine-tuning: keystone-only, a random mask (as many neurons and trainable weights per
projection: ``KeystoneMask.random_like(match="weights")``), PEFT LoRA on the decoder projections
(the baseline, :mod:`keystone_kernels.integrations.lora`), or dense full fine-tuning.

``train(model, tokenizer, mask, dataset, config, output_dir)`` patches the model (modes
``keystone`` / ``random``) and trains with :class:`KeystoneAdamW`, or trains every parameter with
``torch.optim.AdamW`` (mode ``full``), under a warm-up + cosine schedule with gradient clipping.
Batches are a pure function of (seed, step), so a run resumed from a checkpoint takes the same
batches and ends with the same adapter as an uninterrupted one.

Checkpoints (``OUTPUT/checkpoints/step-N-*``, written whole then named by ``LATEST``, see
:mod:`keystone_kernels.checkpoints`: a complete one always exists, whenever a run is killed):
``adapter.safetensors`` (or ``model.safetensors`` in full mode, ``lora_adapter/`` in lora mode),
``optimizer.pt``, ``scheduler.pt``, ``state.json``. Final outputs: ``OUTPUT/keystone_adapter.safetensors`` (keystone /
random modes) or ``OUTPUT/lora_adapter/`` (a PEFT adapter folder, lora mode), ``OUTPUT/merged`` when
asked, ``OUTPUT/metrics.json``.

What each mode makes trainable and writes is :mod:`keystone_kernels.sft_modes`; what makes a
resume honest (the run record, checkpoints read whole, earlier runs moved aside) is
:mod:`keystone_kernels.sft_runs`.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import sft_data
from .analysis.discovery import context_length
from .analysis.verify import default_texts, evaluate_perplexity, score_exact_match
from .checkpoints import CheckpointStore
from .mask import KeystoneMask
from .parallel.ddp import data_parallel
from .sft_config import DEFAULT_LR, MODES, PAPER_MODES, SFTConfig, TrainResult
from .sft_modes import Mode, mode_of
from .sft_runs import (
    latest_checkpoint,
    move_aside,
    newest_loadable,
    run_differences,
    run_record,
    save_checkpoint,
    saved_record,
)
from .tasks import qa_items
from .utils.dist import barrier, is_main_process, rank, world_size
from .utils.io import atomic_dir, atomic_write_text, ensure_writable_dir, remove_temporaries

__all__ = ["MODES", "PAPER_MODES", "DEFAULT_LR", "SFTConfig", "TrainResult", "batch_indices", "prepare", "train",
           "eval_loss", "evaluate", "write_metrics", "finish", "fit_to_context", "latest_checkpoint"]


def batch_indices(n: int, batch_size: int, seed: int, index: int, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices of micro-batch ``index`` on ``rank`` of ``world``: epochs are seeded permutations,
    walked in order, ``batch_size * world`` examples per micro-batch, rank r taking the r-th slice."""
    per_epoch = max(1, n // (batch_size * world))
    epoch, pos = divmod(index, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (pos * world + rank) * batch_size
    return perm[start : start + batch_size].tolist()


def _schedule(optimizer, config: SFTConfig):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_linear_schedule_with_warmup if config.schedule == "linear" else get_cosine_schedule_with_warmup
    return make(optimizer, int(config.warmup_ratio * config.steps), config.steps)


def _state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def prepare(model: nn.Module, mask: KeystoneMask | None, config: SFTConfig):
    """Make ``model`` trainable for ``config.mode``; returns (optimizer, scheduler, mask used or None)."""
    optimizer, mask = mode_of(config.mode).prepare(model, mask, config)
    return optimizer, _schedule(optimizer, config), mask


@torch.no_grad()
def eval_loss(model: nn.Module, dataset: sft_data.SFTDataset, pad_id: int, batch_size: int = 16) -> float:
    """Mean loss per response token over ``dataset``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = sft_data.collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != sft_data.IGNORE).sum())
        total += float(model(**batch).loss.detach()) * n
        count += n
    model.train(was)
    return total / max(1, count)


def train(
    model: nn.Module,
    tokenizer,
    mask: KeystoneMask | None,
    dataset: sft_data.SFTDataset,
    config: SFTConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    eval_dataset: sft_data.SFTDataset | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    origin: dict | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place (see module docstring); returns losses, timings and sizes.

    ``resume=True`` continues the run in ``output_dir``: ``mask`` may be None (the checkpoint's is
    used) or the mask the run was started with; any other difference from the checkpoint's run
    record (:func:`~keystone_kernels.sft_runs.run_differences`; ``origin`` adds facts of the caller's,
    compared too) raises a ValueError listing them. Before training, the output folder is checked
    writable, and every example is checked to fit the model's context.

    Under ``torch.distributed`` (``torchrun``; :func:`~keystone_kernels.utils.dist.init_from_env`)
    every rank calls this: the model is checked to be the same on every rank and wrapped in DDP,
    each rank takes its own ``batch_size`` examples of each step (``batch_size * world`` in all), and
    rank 0 alone writes checkpoints and the adapter. Losses and tokens are rank 0's own.
    """
    config = config or SFTConfig()
    mode = mode_of(config.mode)
    _check_fits_context(model, dataset)
    out = Path(output_dir) if output_dir is not None else None
    store = _open_store(out)
    record = run_record(config, mask, dataset, origin)
    result = TrainResult()
    if resume:
        optimizer, scheduler = _resume(store, model, mask, config, record, result)
    else:
        if store is not None and is_main_process() and store.complete():
            move_aside(store)
        optimizer, scheduler, _ = prepare(model, mask, config)
    result.trainable_parameters = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    _run_steps(model, tokenizer, dataset, eval_dataset, optimizer, scheduler, config, mode, store, record, result,
               progress, on_step)
    barrier()  # the ranks finish together: rank 0's last checkpoint is complete
    result.optimizer_state_bytes = _state_bytes(optimizer)
    result.skipped_steps = int(getattr(optimizer, "skipped_steps", 0))  # capturable (--compile): one sync, here
    if result.skipped_steps:
        warnings.warn(f"{result.skipped_steps} of {config.steps - result.resumed_from} optimizer steps were skipped: "
                      "their gradients held NaN or Inf (the weights did not change in those steps). Lower the "
                      "learning rate, or check the data.", stacklevel=2)
    if out is not None and is_main_process() and mode.final:
        _save_final(mode, model, out / mode.final, store)
    return result


def _open_store(out: Path | None) -> CheckpointStore | None:
    """The run's checkpoint store; on rank 0, the output folder is proven writable and a killed run's
    temporaries are removed (a copy that is the only one is put back first)."""
    if out is None:
        return None
    store = CheckpointStore(out / "checkpoints")
    if is_main_process():
        ensure_writable_dir(out, "output folder")
        remove_temporaries(out)
        store.clean()
    return store


def _resume(store: CheckpointStore | None, model: nn.Module, mask: KeystoneMask | None, config: SFTConfig,
            record: dict, result: TrainResult):
    """Restore the newest checkpoint that loads into the unprepared ``model``; returns (optimizer, scheduler).

    Refuses, listing every difference, a run whose record differs from the checkpoint's; fills
    ``result`` (step, losses, tokens) and ``record`` (what this call did not say: the mask stays as
    the run recorded it).
    """
    if store is None:
        raise ValueError("resume=True needs the output_dir of the run to continue")
    ckpt = newest_loadable(store, config.mode)
    saved = saved_record(ckpt.state)
    differences = run_differences(saved, record)
    if differences:
        raise ValueError(f"--resume: this run differs from the one in {ckpt.folder}:\n  - "
                         + "\n  - ".join(differences)
                         + "\nResume with the checkpoint's settings, or start a new run in another --output.")
    record["mask_sha256"] = record["mask_sha256"] or saved.get("mask_sha256")
    record["origin"] = {**saved.get("origin", {}), **record["origin"]}
    mode = mode_of(config.mode)
    optimizer = mode.restore(model, ckpt.folder / mode.weights, config)
    scheduler = _schedule(optimizer, config)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    result.resumed_from = int(ckpt.state["step"])
    result.losses, result.tokens = list(ckpt.state["losses"]), int(ckpt.state["tokens"])
    return optimizer, scheduler


def _run_steps(model: nn.Module, tokenizer, dataset, eval_dataset, optimizer, scheduler, config: SFTConfig, mode: Mode,
               store: CheckpointStore | None, record: dict, result: TrainResult, progress: bool,
               on_step: Callable[[int, float], None] | None) -> None:
    """The optimizer steps from ``result.resumed_from`` to ``config.steps``: losses, evaluations, checkpoints."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    net = data_parallel(model)  # DDP under torchrun (after a replica check), else the model
    if config.compile:
        net = torch.compile(net)  # inductor, forward and backward; batches of new lengths compile once more
    main = is_main_process()
    model.train()
    bar = tqdm(total=config.steps, initial=result.resumed_from, desc=f"sft[{config.mode}]", unit="step",
               disable=not progress)
    for step in range(result.resumed_from, config.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for micro in range(config.grad_accum):
            idx = batch_indices(len(dataset), config.batch_size, config.seed, step * config.grad_accum + micro,
                                rank(), world_size())
            batch = {k: v.to(device) for k, v in sft_data.collate([dataset[i] for i in idx], pad_id).items()}
            last = micro == config.grad_accum - 1
            with nullcontext() if last or net is model else net.no_sync():  # DDP: one all-reduce per step
                loss = net(**batch).loss / config.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
            step_tokens += int(batch["attention_mask"].sum())
        if not mode.clips_in_step and config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        result.losses.append(step_loss)
        result.step_seconds.append(dt)
        result.tokens += step_tokens
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:.0f}")
        bar.update()
        if on_step is not None:
            on_step(step + 1, step_loss)
        done = step + 1
        if main and eval_dataset is not None and config.eval_every and done % config.eval_every == 0:
            result.eval_losses[done] = eval_loss(model, eval_dataset, pad_id)
            bar.write(f"step {done}: eval loss {result.eval_losses[done]:.4f}")
        if main and store is not None and config.save_every and done % config.save_every == 0 and done < config.steps:
            save_checkpoint(store, model, optimizer, scheduler, done, result, config, record)
    bar.close()


def _save_final(mode: Mode, model: nn.Module, path: Path, store: CheckpointStore | None) -> None:
    try:
        mode.save(model, path)
    except (OSError, RuntimeError) as err:
        last = store.latest() if store is not None else None
        raise RuntimeError(f"could not write {path} ({err}); the trained model is still in memory, and the last "
                           f"checkpoint is {last or 'none'}") from err


def fit_to_context(max_length: int, model: nn.Module) -> int:
    """``max_length``, or the model's context when that is shorter (with a warning: examples are cut to it)."""
    context = context_length(model)
    if context is not None and max_length > context:
        warnings.warn(f"max_length={max_length} is longer than the model's context of {context} tokens: training "
                      f"examples are cut to {context} (prompt first, then the response)", stacklevel=2)
        return context
    return max_length


def _check_fits_context(model: nn.Module, dataset) -> None:
    """Refuse examples longer than the model's context (Llama would read garbage positions, GPT-2 fails)."""
    context = context_length(model)
    examples = getattr(dataset, "examples", None)
    if context is None or not examples:
        return
    longest = max(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    if len(examples[longest].input_ids) > context:
        raise ValueError(f"training example {longest} has {len(examples[longest].input_ids)} tokens, more than the "
                         f"model's context of {context}; build the dataset with max_length <= {context} "
                         "(the CLI does, with a warning)")


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, tokenizer, eval_items: list[dict], texts: list[str] | None = None,
             qa: list[dict] | None = None, max_new_tokens: int = 24) -> dict[str, float]:
    """Target accuracy (greedy exact match), preservation: perplexity on ``texts`` and QA accuracy."""
    was = model.training
    model.eval()
    try:
        return {
            "accuracy": score_exact_match(model, tokenizer, eval_items, max_new_tokens=max_new_tokens, batch_size=25),
            "perplexity": evaluate_perplexity(model, tokenizer, texts or default_texts()),
            "qa_accuracy": score_exact_match(model, tokenizer, qa or qa_items(), max_new_tokens=8, batch_size=20),
        }
    finally:
        model.train(was)


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=1,
                                       default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else str(o)))


def finish(model: nn.Module, output_dir: str | os.PathLike, merged: bool, mode: str = "keystone") -> None:
    """Optionally write the merged plain model of a run of ``mode`` (``OUTPUT/merged``, atomic)."""
    if not merged:
        return
    plain = mode_of(mode).merged(model)
    with atomic_dir(Path(output_dir) / "merged") as tmp:
        plain.save_pretrained(tmp)

"""Supervised fine-tuning: keystone-only, a random mask (as many neurons and trainable weights per
projection: ``KeystoneMask.random_like(match="weights")``), PEFT LoRA on the decoder projections
(the baseline, :mod:`keystone_kernels.lora`), or dense full fine-tuning.

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

A resume continues the same run or refuses: ``state.json`` records the settings that shape the
run (lr, seed, batch size, ...), a hash of the mask the run was given and of the tokenized data,
and a resume with any of them different raises, listing every difference. A checkpoint that does
not load is reported with its path and the next older one is tried. A new run into a folder that
holds another run's checkpoints moves them aside (``OUTPUT/checkpoints.previous-<time>``) and says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import sft_data
from ._io import atomic_dir, atomic_write_text, ensure_writable_dir, remove_temporaries
from .adapter import load_adapter, read_adapter, save_adapter
from .checkpoints import CheckpointStore
from .mask import KeystoneMask
from .optim import KeystoneAdamW
from .patching import keystone_parameters, merge, patch

MODES = ("keystone", "random", "lora", "full")
# SFTConfig fields that shape a run's trajectory: a resume with another value of any is refused
# (steps may grow or shrink: the schedule follows it; eval / save cadence and backend change nothing).
RUN_FIELDS = ("mode", "learning_rate", "batch_size", "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm",
              "seed", "frozen_dtype", "lora_r")
# From the learning-rate sweeps in README.md (SmolLM2-135M, 2-digit addition, 60-150 steps x 8); LoRA r=16:
# 3e-4 (acc 0.77, ppl x1.03, QA 0.35) over 1e-3 (acc 0.81, ppl x1.13, QA 0.05).
DEFAULT_LR = {"keystone": 1e-3, "random": 1e-3, "lora": 3e-4, "full": 2e-5}


@dataclass
class SFTConfig:
    """Training settings. ``lr=None`` takes :data:`DEFAULT_LR` of the mode."""

    mode: str = "keystone"
    steps: int = 150
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    frozen_dtype: str = "bfloat16"
    backend: str | None = "auto"
    lora_r: int = 16  # lora mode: rank on q, k, v, o, gate, up, down; alpha = 2 r, no dropout

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mode == "lora" and (int(self.lora_r) != self.lora_r or self.lora_r < 1):
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        if self.frozen_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"frozen_dtype must be bfloat16, float16 or float32, got {self.frozen_dtype!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step
    step_seconds: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    trainable_parameters: int = 0
    optimizer_state_bytes: int = 0
    resumed_from: int = 0

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")


def batch_indices(n: int, batch_size: int, seed: int, index: int, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices of micro-batch ``index`` on ``rank`` of ``world``: epochs are seeded permutations,
    walked in order, ``batch_size * world`` examples per micro-batch, rank r taking the r-th slice."""
    per_epoch = max(1, n // (batch_size * world))
    epoch, pos = divmod(index, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (pos * world + rank) * batch_size
    return perm[start : start + batch_size].tolist()


def _schedule(optimizer, config: SFTConfig):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * config.steps), config.steps)


def _state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def prepare(model: nn.Module, mask: KeystoneMask | None, config: SFTConfig):
    """Patch (keystone / random), add LoRA (lora) or unfreeze (full) ``model``; returns (optimizer, scheduler,
    mask used)."""
    lr = config.learning_rate
    if config.mode == "lora":  # PEFT LoRA injected into ``model``; torch AdamW over the adapters
        from .lora import add_lora, lora_optimizer

        add_lora(model, r=config.lora_r)
        optimizer = lora_optimizer(model, lr, config.weight_decay)
        return optimizer, _schedule(optimizer, config), None
    if config.mode == "full":
        model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, foreach=True)
        return optimizer, _schedule(optimizer, config), None
    if mask is None:
        raise ValueError(f"mode {config.mode!r} needs a mask (find_keystone(...).mask or --top-fraction)")
    if config.mode == "random":
        # the fair control: as many neurons and rows / columns per projection, so as many trainable weights
        mask = mask.random_like(config.seed, model, match="weights")
    patch(model, mask, frozen_dtype=getattr(torch, config.frozen_dtype), backend=config.backend)
    optimizer = KeystoneAdamW(keystone_parameters(model), lr=lr, weight_decay=config.weight_decay,
                              max_grad_norm=config.max_grad_norm, backend=config.backend)
    return optimizer, _schedule(optimizer, config), mask


def run_record(config: SFTConfig, mask: KeystoneMask | None, dataset: sft_data.SFTDataset,
               origin: dict | None = None) -> dict:
    """What identifies a run, for ``state.json``: the settings of :data:`RUN_FIELDS`, a SHA-256 of the mask it
    was given (before ``random`` mode draws its own) and of the tokenized training data, and ``origin``
    (free-form facts a caller adds, e.g. the CLI's ``--top-fraction``)."""
    examples = getattr(dataset, "examples", None)  # an SFTDataset; another Dataset's data is not recorded
    data = None
    if examples is not None:
        digest = hashlib.sha256()
        for e in examples:
            digest.update(json.dumps([e.input_ids, e.labels]).encode())
        data = digest.hexdigest()
    mask_hash = None if mask is None else hashlib.sha256(json.dumps(mask.to_dict(), sort_keys=True).encode())
    return {"settings": {name: getattr(config, name) for name in RUN_FIELDS},
            "mask_sha256": None if mask_hash is None else mask_hash.hexdigest(),
            "data_sha256": data, "examples": len(dataset), "origin": dict(origin or {})}


def run_differences(saved: dict, now: dict) -> list[str]:
    """The ways run record ``now`` differs from ``saved`` (both from :func:`run_record`), one line each.

    A mask or an origin fact that one side does not record is not compared (a resume without --mask
    takes the checkpoint's own).
    """
    out = []
    for name, value in now["settings"].items():
        old = saved.get("settings", {}).get(name, value)
        if old != value:
            out.append(f"{name}: {old!r} in the checkpoint, {value!r} now")
    if now["mask_sha256"] and saved.get("mask_sha256") and now["mask_sha256"] != saved["mask_sha256"]:
        out.append("mask: not the mask the checkpoint was trained with")
    if saved.get("data_sha256") and now["data_sha256"] and saved["data_sha256"] != now["data_sha256"]:
        out.append(f"training data: {saved.get('examples')} examples in the checkpoint, {now['examples']} now, and "
                   "their tokens differ (another --data file, --max-length or tokenizer)")
    for key, value in now["origin"].items():
        old = saved.get("origin", {}).get(key, value)
        if old != value:
            out.append(f"{key}: {old!r} in the checkpoint, {value!r} now")
    return out


def _save_checkpoint(store: CheckpointStore, model, optimizer, scheduler, step: int, result: TrainResult,
                     config: SFTConfig, record: dict) -> None:
    try:
        store.save(step, lambda tmp: _write_checkpoint(tmp, model, optimizer, scheduler, step, result, config, record))
    except (OSError, RuntimeError) as err:  # disk full, read-only, quota: torch.save says only "iostream error"
        last = store.latest()
        kept = f"the last complete checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
        raise RuntimeError(f"could not write the checkpoint of step {step} under {store.root} ({err}); nothing was "
                           f"half-written: {kept}. Free disk space or fix the folder, then run again with "
                           "--resume") from err


def _write_checkpoint(tmp: Path, model, optimizer, scheduler, step: int, result: TrainResult,
                      config: SFTConfig, record: dict) -> None:
    if config.mode == "full":
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
    elif config.mode == "lora":
        from .lora import save_lora

        save_lora(model, tmp / "lora_adapter")
    else:
        save_adapter(model, tmp / "adapter.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    state = {"step": step, "losses": result.losses, "tokens": result.tokens, "config": asdict(config), "run": record}
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run in ``output_dir`` (or of the older single-folder layout,
    ``OUTPUT/checkpoint``); None when there is none."""
    out = Path(output_dir)
    latest = CheckpointStore(out / "checkpoints").latest()
    legacy = out / "checkpoint"
    if latest is None and (legacy / "state.json").is_file():
        return legacy
    return latest


class CheckpointUnreadable(ValueError):
    """A file of a checkpoint is missing, truncated or damaged (the message names it)."""


@dataclass
class _Checkpoint:
    """A checkpoint read whole (every file parsed) before anything is applied to a model."""

    folder: Path
    state: dict
    optimizer: dict
    scheduler: dict


def read_checkpoint(folder: Path, mode: str) -> _Checkpoint:
    """Read and check every file of a checkpoint: :class:`CheckpointUnreadable` naming the file and what is wrong
    with it, or a ValueError for a checkpoint of another mode."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not {"step", "losses", "tokens", "config"} <= set(state):
            raise ValueError("it lacks step / losses / tokens / config")
        int(state["step"])
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointUnreadable(f"{path} does not load: {err}") from None
    if state["config"].get("mode") != mode:
        raise ValueError(f"{folder} is a {state['config'].get('mode')!r} checkpoint, this run is {mode!r}")
    loaded = {}
    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            loaded[name] = torch.load(folder / name, weights_only=True)
        except Exception as err:  # noqa: BLE001  (torch.load raises RuntimeError, EOFError, UnpicklingError...)
            raise CheckpointUnreadable(f"{folder / name} does not load ({type(err).__name__}: {str(err)[:200]}); the "
                                       "file is truncated or damaged") from None
    try:
        if mode == "full":
            from safetensors.torch import load_file

            load_file(str(folder / "model.safetensors"))
        elif mode == "lora":
            from safetensors.torch import load_file

            weights = sorted((folder / "lora_adapter").glob("*.safetensors"))
            if not weights:
                raise ValueError(f"{folder / 'lora_adapter'} holds no adapter weights")
            for f in weights:
                load_file(str(f))
        else:
            read_adapter(folder / "adapter.safetensors")
    except Exception as err:  # noqa: BLE001  (safetensors and read_adapter raise several types)
        raise CheckpointUnreadable(f"{folder}: {err}") from None
    return _Checkpoint(folder, state, loaded["optimizer.pt"], loaded["scheduler.pt"])


def _read_newest_loadable(store: CheckpointStore, mode: str) -> _Checkpoint:
    """The newest checkpoint that loads; each one that does not is reported (a warning naming it)."""
    failures = []
    legacy = store.root.parent / "checkpoint"  # the single-folder layout of earlier versions
    for folder in store.candidates() + ([legacy] if (legacy / "state.json").is_file() else []):
        try:
            return read_checkpoint(folder, mode)
        except CheckpointUnreadable as err:
            failures.append(str(err))
            warnings.warn(f"skipping a checkpoint that does not load: {err}; trying the next older one",
                          stacklevel=3)
    raise FileNotFoundError(f"--resume: no checkpoint under {store.root} loads: " + "; ".join(failures)
                            if failures else f"--resume: no complete checkpoint under {store.root}")


def _load_checkpoint(ckpt: _Checkpoint, model, config: SFTConfig, mask):
    """Restore a checkpoint into the *unpatched* ``model``; returns (optimizer, scheduler, step, losses, tokens)."""
    folder, state = ckpt.folder, ckpt.state
    if config.mode == "full":
        from safetensors.torch import load_model

        load_model(model, str(folder / "model.safetensors"))
        optimizer, scheduler, _ = prepare(model, None, config)
    elif config.mode == "lora":
        from .lora import load_lora_weights

        optimizer, scheduler, _ = prepare(model, None, config)
        load_lora_weights(model, folder / "lora_adapter")
    else:
        load_adapter(model, folder / "adapter.safetensors", frozen_dtype=getattr(torch, config.frozen_dtype),
                     backend=config.backend)
        optimizer = KeystoneAdamW(keystone_parameters(model), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  max_grad_norm=config.max_grad_norm, backend=config.backend)
        scheduler = _schedule(optimizer, config)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    return optimizer, scheduler, int(state["step"]), state["losses"], int(state["tokens"])


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
    record (:func:`run_differences`; ``origin`` adds facts of the caller's, compared too) raises a
    ValueError listing them. Before training, the output folder is checked writable, and every
    example is checked to fit the model's context.

    Under ``torch.distributed`` (``torchrun``; :func:`~keystone_kernels.distributed.init_from_env`)
    every rank calls this: the model is checked to be the same on every rank and wrapped in DDP,
    each rank takes its own ``batch_size`` examples of each step (``batch_size * world`` in all), and
    rank 0 alone writes checkpoints and the adapter. Losses and tokens are rank 0's own.
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from . import distributed

    config = config or SFTConfig()
    _check_fits_context(model, dataset)
    out = Path(output_dir) if output_dir is not None else None
    store = CheckpointStore(out / "checkpoints") if out is not None else None
    main = distributed.is_main_process()
    if out is not None and main:
        ensure_writable_dir(out, "output folder")
        remove_temporaries(out)  # what a killed run left; a copy that is the only one is put back first
        store.clean()
    record = run_record(config, mask, dataset, origin)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    result = TrainResult()
    start_step = 0
    if resume:
        if store is None:
            raise ValueError("resume=True needs the output_dir of the run to continue")
        ckpt = _read_newest_loadable(store, config.mode)
        saved = _saved_record(ckpt.state)
        differences = run_differences(saved, record)
        if differences:
            raise ValueError(f"--resume: this run differs from the one in {ckpt.folder}:\n  - "
                             + "\n  - ".join(differences)
                             + "\nResume with the checkpoint's settings, or start a new run in another --output.")
        # what this call did not say (no mask: the checkpoint's is used) stays as the run recorded it
        record["mask_sha256"] = record["mask_sha256"] or saved.get("mask_sha256")
        record["origin"] = {**saved.get("origin", {}), **record["origin"]}
        optimizer, scheduler, start_step, result.losses, result.tokens = _load_checkpoint(ckpt, model, config, mask)
        result.resumed_from = start_step
    else:
        if store is not None and main and store.complete():
            _move_aside(store)
        optimizer, scheduler, mask = prepare(model, mask, config)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    result.trainable_parameters = sum(p.numel() for p in params)
    net = distributed.data_parallel(model)  # DDP under torchrun (after a replica check), else the model
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main_process()
    model.train()
    bar = tqdm(total=config.steps, initial=start_step, desc=f"sft[{config.mode}]", unit="step", disable=not progress)
    for step in range(start_step, config.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for micro in range(config.grad_accum):
            index = step * config.grad_accum + micro
            idx = batch_indices(len(dataset), config.batch_size, config.seed, index, rank, world)
            batch = {k: v.to(device) for k, v in sft_data.collate([dataset[i] for i in idx], pad_id).items()}
            last = micro == config.grad_accum - 1
            with nullcontext() if last or net is model else net.no_sync():  # DDP: one all-reduce per step
                loss = net(**batch).loss / config.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
            step_tokens += int(batch["attention_mask"].sum())
        if config.mode in ("full", "lora") and config.max_grad_norm is not None:
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
            _save_checkpoint(store, model, optimizer, scheduler, done, result, config, record)
    bar.close()
    distributed.barrier()  # the ranks finish together: rank 0's last checkpoint is complete
    result.optimizer_state_bytes = _state_bytes(optimizer)
    if out is not None and main and config.mode != "full":
        final = out / ("lora_adapter" if config.mode == "lora" else "keystone_adapter.safetensors")
        try:
            if config.mode == "lora":
                from .lora import save_lora

                save_lora(model, final)
            else:
                save_adapter(model, final)
        except (OSError, RuntimeError) as err:
            last = store.latest()
            raise RuntimeError(f"could not write {final} ({err}); the trained model is still in memory, and the last "
                               f"checkpoint is {last or 'none'}") from err
    return result


def _saved_record(state: dict) -> dict:
    """The run record of a checkpoint's ``state.json`` (built from its config for checkpoints written before
    records existed: their mask and data cannot be compared)."""
    if "run" in state:
        return state["run"]
    config = dict(state["config"])
    lr = config.get("lr")
    config["learning_rate"] = lr if lr is not None else DEFAULT_LR.get(config.get("mode"), lr)
    return {"settings": {name: config[name] for name in RUN_FIELDS if name in config}}


def _move_aside(store: CheckpointStore) -> None:
    """A new run into a folder with another run's checkpoints: keep them, under a name that says when."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = store.root.with_name(f"{store.root.name}.previous-{stamp}")
    n = 1
    while aside.exists():
        aside, n = store.root.with_name(f"{store.root.name}.previous-{stamp}-{n}"), n + 1
    newest = store.latest()
    os.replace(store.root, aside)
    warnings.warn(f"{store.root} held the checkpoints of an earlier run (newest: {newest.name if newest else '-'}); "
                  f"they were moved to {aside}, and this new run starts from step 0. Pass --resume to continue a "
                  "run instead.", stacklevel=3)


def fit_to_context(max_length: int, model: nn.Module) -> int:
    """``max_length``, or the model's context when that is shorter (with a warning: examples are cut to it)."""
    from .discovery import context_length

    context = context_length(model)
    if context is not None and max_length > context:
        warnings.warn(f"max_length={max_length} is longer than the model's context of {context} tokens: training "
                      f"examples are cut to {context} (prompt first, then the response)", stacklevel=2)
        return context
    return max_length


def _check_fits_context(model: nn.Module, dataset) -> None:
    """Refuse examples longer than the model's context (Llama would read garbage positions, GPT-2 fails)."""
    from .discovery import context_length

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
    from .tasks import qa_items
    from .verify import default_texts, evaluate_perplexity, score_exact_match

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


def finish(model: nn.Module, output_dir: str | os.PathLike, merged: bool, dtype: torch.dtype | None = None) -> None:
    """Optionally write the merged plain model (``OUTPUT/merged``, atomic)."""
    if not merged:
        return
    if getattr(model, "_keystone", None) is not None:
        merge(model, dtype)
    elif model.__dict__.get("_keystone_peft") is not None:  # lora mode: fold the adapters in
        from .lora import merge_lora

        model = merge_lora(model)
    with atomic_dir(Path(output_dir) / "merged") as tmp:
        model.save_pretrained(tmp)

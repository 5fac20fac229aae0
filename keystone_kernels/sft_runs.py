"""What makes a resume honest: the run record, checkpoints written whole, read whole, and other runs kept apart.

A checkpoint (``OUTPUT/checkpoints/step-N-*``, :mod:`keystone_kernels.checkpoints`) holds the mode's
weights (:mod:`keystone_kernels.sft_modes`), ``optimizer.pt``, ``scheduler.pt`` and ``state.json``
(step, losses, tokens, the config and the run record). A resume reads every file of a checkpoint
before it applies any (:func:`read_checkpoint`), names one that does not load and tries the next
older one (:func:`newest_loadable`), and refuses a run whose record differs
(:func:`run_differences`). A new run into the folder of an earlier one moves its checkpoints aside
(:func:`move_aside`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoints import CheckpointStore
from .mask import KeystoneMask
from .sft_config import DEFAULT_LR, SFTConfig, TrainResult
from .sft_modes import mode_of

__all__ = ["RUN_FIELDS", "run_record", "run_differences", "saved_record", "save_checkpoint", "latest_checkpoint",
           "CheckpointUnreadable", "Checkpoint", "read_checkpoint", "newest_loadable", "move_aside"]

# SFTConfig fields that shape a run's trajectory: a resume with another value of any is refused
# (steps may grow or shrink: the schedule follows it; eval / save cadence and backend change nothing).
RUN_FIELDS = ("mode", "learning_rate", "batch_size", "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm",
              "seed", "frozen_dtype", "lora_r", "schedule")


def run_record(config: SFTConfig, mask: KeystoneMask | None, dataset,
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


def saved_record(state: dict) -> dict:
    """The run record of a checkpoint's ``state.json`` (built from its config for checkpoints written before
    records existed: their mask and data cannot be compared)."""
    if "run" in state:
        return state["run"]
    config = dict(state["config"])
    lr = config.get("lr")
    config["learning_rate"] = lr if lr is not None else DEFAULT_LR.get(config.get("mode"), lr)
    return {"settings": {name: config[name] for name in RUN_FIELDS if name in config}}


def save_checkpoint(store: CheckpointStore, model, optimizer, scheduler, step: int, result: TrainResult,
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
    mode = mode_of(config.mode)
    mode.save(model, tmp / mode.weights)
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
class Checkpoint:
    """A checkpoint read whole (every file parsed) before anything is applied to a model."""

    folder: Path
    state: dict
    optimizer: dict
    scheduler: dict


def read_checkpoint(folder: Path, mode: str) -> Checkpoint:
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
    weights = folder / mode_of(mode).weights
    try:
        mode_of(mode).check(weights)
    except Exception as err:  # noqa: BLE001  (safetensors and read_adapter raise several types)
        raise CheckpointUnreadable(f"{folder}: {err}") from None
    return Checkpoint(folder, state, loaded["optimizer.pt"], loaded["scheduler.pt"])


def newest_loadable(store: CheckpointStore, mode: str) -> Checkpoint:
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


def move_aside(store: CheckpointStore) -> None:
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

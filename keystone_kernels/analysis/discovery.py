"""Finding keystone neurons: recording, top-fraction selection, intersection over prompt groups.

For each prompt group, probes (:mod:`keystone_kernels.probe`) record the mean |activation| of every
neuron (docs/design.md section 1, the paper's definitions) over the chosen token positions:

- ``positions="last"``: the last real token of each prompt;
- ``"all"``: every real prompt token (token-weighted);
- ``"generate"``: the paper's protocol. The model answers each prompt greedily (its repetition
  penalty, stop at eos, see :mod:`keystone_kernels.decoding`), and the last prompt token plus every
  generated token fed back are recorded, in one teacher-forced pass over prompt + response.

A group's selection comes from the group's token-weighted mean (``group_pool="tokens"``) or, as in
the paper, from each prompt's own mean with the prompts' selections intersected
(``group_pool="prompts"``). Neurons are ranked per layer, per type across layers, or globally; the
keystone set is the intersection of the groups' selections, and :mod:`keystone_kernels.overlap`
says how far the groups agree.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import arch
from ..mask import KeystoneMask, NeuronKey, layer_key
from .decoding import DEFAULT_MAX_NEW_TOKENS, generate_responses
from .overlap import Overlap, overlap
from .probe import Probe

SELECTIONS = ("per_layer", "global_per_type", "global")
POSITIONS = ("last", "all", "generate")
GROUP_POOLS = ("tokens", "prompts")
ROUNDINGS = ("floor", "ceil", "paper")


# ---------------------------------------------------------------------------------------- prompts
def default_prompts() -> dict[str, list[str]]:
    """The shipped prompt groups (math, code, knowledge, multilingual; 8+ prompts each)."""
    text = resources.files("keystone_kernels").joinpath("data/prompts.json").read_text(encoding="utf-8")
    return json.loads(text)


def _check_prompts(prompts) -> dict[str, list[str]]:
    if not isinstance(prompts, dict) or not prompts:
        raise ValueError("prompts must be a non-empty dict {group_name: [prompt, ...]}")
    for name, group in prompts.items():
        if isinstance(group, str) or not group or not all(isinstance(p, str) and p.strip() for p in group):
            raise ValueError(f"prompt group {name!r} must be a non-empty list of non-empty strings")
    return prompts


def use_chat_template(tokenizer, chat: bool | None, positions: str) -> bool:
    """Resolve ``chat``: True / False as given; None (auto) applies the template for ``"generate"``
    when the tokenizer has one (a model answers as an assistant), never for ``"last"`` / ``"all"``
    (so masks found before this option existed stay the same)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        return positions == "generate" and has_template
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template; pass chat=False (or None: auto)")
    return bool(chat)


def context_length(model: nn.Module) -> int | None:
    """Positions the model can attend over (``max_position_embeddings`` / GPT-2's ``n_positions``), if known."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode(tokenizer, prompts: Sequence, chat: bool, max_length: int) -> list[list[int]]:
    """Token ids per prompt; a prompt given as a list of ints is taken as is (no template)."""
    out = []
    for p in prompts:
        if not isinstance(p, str):
            ids = [int(t) for t in p]
        elif chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        if not len(ids):
            raise ValueError(f"prompt {p!r} encodes to no tokens")
        out.append(list(ids)[:max_length])
    return out


def _right_padded(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding keeps position ids of real tokens unchanged under a causal mask."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------- recording
@dataclass
class Recording:
    """Sums of |activation| per prompt, as :func:`record` left them (on the CPU).

    ``sums[key]``: float64 ``[P, N]``; ``counts[key]``: float64 ``[P]`` (positions, or tokens routed to
    an expert); ``sizes[key]``: N; ``tokens``: recorded positions per prompt; ``responses``: the
    generated ids per prompt (``positions="generate"`` only).
    """

    sums: dict[NeuronKey, torch.Tensor]
    counts: dict[NeuronKey, torch.Tensor]
    sizes: dict[NeuronKey, int]
    tokens: list[int]
    responses: list[list[int]] | None = None

    def pooled(self) -> dict[NeuronKey, torch.Tensor]:
        """Token-weighted mean over all prompts: ``{key: fp32 [N]}`` (zeros for a key never reached)."""
        out = {}
        for key, size in self.sizes.items():
            count = float(self.counts[key].sum()) if key in self.counts else 0.0
            out[key] = (self.sums[key].sum(0) / count).float() if count > 0 else torch.zeros(size)
        return out

    def per_prompt(self) -> dict[NeuronKey, torch.Tensor]:
        """Each prompt's own mean: ``{key: fp32 [P, N]}`` (zero rows where a prompt never reached a key)."""
        out = {}
        for key, size in self.sizes.items():
            if key not in self.sums:
                out[key] = torch.zeros(len(self.tokens), size)
                continue
            counts = self.counts[key][:, None]
            out[key] = torch.where(counts > 0, self.sums[key] / counts.clamp_min(1e-300), 0.0).float()
        return out


@torch.no_grad()
def record(
    model: nn.Module,
    tokenizer,
    prompts: Sequence,
    types=None,
    positions: str = "last",
    chat: bool | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    modules: dict | None = None,
    progress=None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Recording:
    """Record |activation| sums per prompt over ``positions`` (see the module docstring).

    ``prompts``: strings, or lists of token ids taken as is. ``chat``: see :func:`use_chat_template`.
    ``progress``: a tqdm bar, advanced per prompt ("last" / "all") or per generated token ("generate").
    Batches are right-padded for recording; padding is never counted.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    family = arch.family_for(model, modules)
    keys = arch.neuron_keys(model, family, types)
    encoded = _encode(tokenizer, prompts, use_chat_template(tokenizer, chat, positions), max_length)
    context = context_length(model)
    if context is not None:  # past the context a model reads garbage positions (Llama) or fails (GPT-2)
        generating = positions == "generate"
        if generating and max_new_tokens > context - 1:
            warnings.warn(f"max_new_tokens={max_new_tokens} does not fit the model's context of {context} tokens; "
                          f"generating at most {context - 1}", stacklevel=2)
            max_new_tokens = context - 1
        room = context - (max_new_tokens if generating else 0)
        too_long = [(i, len(ids)) for i, ids in enumerate(encoded) if len(ids) > room]
        if too_long:
            i, n = too_long[0]
            why = f"the model's context of {context}" + (f" less max_new_tokens={max_new_tokens}" if generating else "")
            warnings.warn(f"{len(too_long)} prompt(s) are longer than {room} tokens ({why}; first: prompt {i}, {n} "
                          f"tokens): recording their first {room} tokens only. Shorten them, or pass max_length <= "
                          f"{room} to choose this yourself", stacklevel=2)
            encoded = [ids[:room] for ids in encoded]
    responses = None
    if positions == "generate":
        responses = generate_responses(model, tokenizer, encoded, max_new_tokens, batch_size, progress)
        # every generated token but the last was fed back; the last prompt token starts the record
        seqs = [p + r[:-1] for p, r in zip(encoded, responses)]
        first = [len(p) - 1 for p in encoded]
    else:
        seqs = encoded
        first = [len(p) - 1 if positions == "last" else 0 for p in encoded]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        with Probe(model, family, keys, rows=len(seqs)) as probe:
            for start in range(0, len(seqs), batch_size):
                batch = seqs[start : start + batch_size]
                ids, mask = _right_padded(batch, pad_id, device)
                weights = mask.float()
                for r, f in enumerate(first[start : start + batch_size]):
                    weights[r, :f] = 0.0
                probe.recorder.weights = weights
                probe.recorder.batch_rows = torch.arange(start, start + len(batch), device=device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                if progress is not None and positions != "generate":
                    progress.update(len(batch))
    finally:
        model.train(was_training)
    rec = probe.recorder
    return Recording({k: v.cpu() for k, v in rec.sums.items()}, {k: v.cpu() for k, v in rec.counts.items()},
                     {k: s.size for k, s in keys.items()}, [len(s) - f for s, f in zip(seqs, first)], responses)


def collect_activations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence,
    types=None,
    positions: str = "last",
    chat: bool | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    modules: dict | None = None,
    progress=None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[NeuronKey, torch.Tensor]:
    """Token-weighted mean |activation| per neuron over ``prompts``: ``{(type, layer, expert): fp32 [size]}``
    on the CPU. Arguments as in :func:`record`."""
    return record(model, tokenizer, prompts, types, positions, chat, batch_size, max_length, modules, progress,
                  max_new_tokens).pooled()


# ---------------------------------------------------------------------------------------- selection
def _k_of(n: int, fraction: float, ceil: bool = False) -> int:
    return max(1, math.ceil(n * fraction) if ceil else int(n * fraction))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores; ties go to the lower index (stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def select_top(scores: dict[NeuronKey, torch.Tensor], fraction: float, selection: str = "per_layer",
               rounding: str = "floor") -> dict[NeuronKey, torch.Tensor]:
    """Pick the top ``fraction`` of neurons by score.

    ``per_layer``: k = ``max(1, int(n * fraction))`` per (type, layer, expert);
    ``global_per_type``: k of all layers' neurons of each type, ranked together;
    ``global``: k of all neurons of all types and layers, ranked together.
    ``rounding``: ``"floor"`` (``int``, as above), ``"ceil"`` (``math.ceil``, at least 1) or ``"paper"``
    (the paper's script: ceil for ``global``, floor for the others).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {fraction}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    ceil = rounding == "ceil" or (rounding == "paper" and selection == "global")
    keys = sorted(scores, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2]))
    if selection == "per_layer":
        return {k: torch.sort(_top(scores[k], _k_of(len(scores[k]), fraction, ceil))).values for k in keys}
    types = dict.fromkeys(k[0] for k in keys)
    pools = [keys] if selection == "global" else [[k for k in keys if k[0] == t] for t in types]
    out: dict[NeuronKey, torch.Tensor] = {}
    for pool in pools:
        flat = torch.cat([scores[k].float() for k in pool])
        chosen = _top(flat, _k_of(len(flat), fraction, ceil))
        starts = list(itertools.accumulate([0] + [len(scores[k]) for k in pool]))
        for k, lo, hi in zip(pool, starts[:-1], starts[1:]):
            sel = chosen[(chosen >= lo) & (chosen < hi)] - lo
            out[k] = torch.sort(sel).values
    return out


def _intersection(masks: Sequence[KeystoneMask]) -> KeystoneMask:
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


# ---------------------------------------------------------------------------------------- find
@dataclass
class Discovery:
    """What :func:`find_keystone` found.

    ``mask``: the keystone neurons (intersection over groups); ``group_masks``: each group's own
    selection; ``overlap``: how far the groups agree (:class:`keystone_kernels.overlap.Overlap`:
    pooled IoU, overlap-vs-single, pairwise IoU, the same per type and per layer); ``iou`` and
    ``pairwise_iou``: its headline figures; ``scores``: per-group token-weighted mean |activation|
    ``{group: {key: fp32 [size]}}``; ``total_neurons``: size of the searched index space;
    ``recorded_tokens``: positions recorded per group; ``responses``: the model's decoded answers per
    group (``positions="generate"`` only).
    """

    mask: KeystoneMask
    group_masks: dict[str, KeystoneMask]
    pairwise_iou: dict[str, float]
    iou: float
    scores: dict[str, dict[NeuronKey, torch.Tensor]] = field(repr=False)
    total_neurons: int = 0
    overlap: Overlap | None = field(default=None, repr=False)
    recorded_tokens: dict[str, int] = field(default_factory=dict)
    responses: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def fraction(self) -> float:
        return self.mask.num_neurons / max(1, self.total_neurons)

    @property
    def overlap_vs_single(self) -> float:
        return self.overlap.overlap_vs_single if self.overlap is not None else 0.0


def find_keystone(
    model: nn.Module,
    tokenizer,
    prompts: dict[str, list[str]] | None = None,
    top_fraction: float = 0.01,
    selection: str = "per_layer",
    positions: str = "last",
    types=None,
    chat: bool | None = None,
    batch_size: int = 8,
    modules: dict | None = None,
    progress: bool = True,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    group_pool: str = "tokens",
    rounding: str = "floor",
    max_length: int = 512,
) -> Discovery:
    """Find the keystone neurons of ``model`` with a few prompt groups.

    Args:
        prompts: ``{group_name: [prompt, ...]}``; None uses :func:`default_prompts`.
        top_fraction: fraction of neurons each group (or prompt) selects.
        selection: ``"per_layer"`` (the reference), ``"global_per_type"`` or ``"global"``.
        positions: ``"last"`` (last real token of each prompt), ``"all"`` (every prompt token) or
            ``"generate"`` (the paper's protocol: the last prompt token and the model's own greedy
            response, at most ``max_new_tokens`` new tokens; the paper allowed 16000).
        types: neuron types (see :mod:`keystone_kernels.arch`); None = the paper's six;
            ``"residual"`` / ``"all"`` add residual-stream channels.
        chat: wrap each prompt in the tokenizer's chat template as a user turn; None (auto) does
            so for ``"generate"`` when the tokenizer has a template (:func:`use_chat_template`).
        group_pool: ``"tokens"`` (a group's tokens pooled into one mean) or ``"prompts"`` (each prompt
            selects its own set, the group keeps their intersection, as in the paper).
        rounding: how many neurons a fraction means, see :func:`select_top` (``"paper"`` matches the
            paper's script: ceil for ``selection="global"``).
        modules: module names for an architecture not in :data:`arch.FAMILIES`.

    Returns:
        :class:`Discovery`, whose ``mask`` is the intersection over groups.
    """
    prompts = _check_prompts(default_prompts() if prompts is None else prompts)
    _check_choices(top_fraction, selection, positions, group_pool, rounding)
    types = arch.resolve_types(types)
    use_chat = use_chat_template(tokenizer, chat, positions)
    generate = positions == "generate"
    n_prompts = sum(len(g) for g in prompts.values())
    bar = tqdm(total=None if generate else n_prompts, desc="Generating (greedy) for recording" if generate else
               "Probing activations", unit="tok" if generate else "prompt", disable=not progress)
    scores, group_masks, recorded, responses = {}, {}, {}, {}
    with bar:
        for name, group in prompts.items():
            bar.set_postfix(group=name)
            rec = record(model, tokenizer, group, types, positions, use_chat, batch_size, max_length, modules, bar,
                         max_new_tokens)
            scores[name] = rec.pooled()
            recorded[name] = sum(rec.tokens)
            if rec.responses is not None:
                responses[name] = tokenizer.batch_decode(rec.responses, skip_special_tokens=True)
            group_masks[name] = _group_mask(rec, scores[name], len(group), top_fraction, selection, rounding,
                                            group_pool)
    sizes = {k: len(v) for k, v in next(iter(scores.values())).items()}
    meta_sizes = {f"{k[0]}/{layer_key(k[1], k[2])}": n for k, n in sizes.items()}
    for m in group_masks.values():
        m.metadata = {"sizes": meta_sizes}
    keystone = _intersection(list(group_masks.values()))
    stats = overlap(group_masks)
    total = sum(sizes.values())
    keystone.metadata = {
        "model": getattr(model.config, "name_or_path", None) or type(model).__name__,
        "top_fraction": top_fraction,
        "selection": selection,
        "rounding": rounding,
        "positions": positions,
        **({"max_new_tokens": max_new_tokens} if generate else {}),
        "types": list(types),
        "chat": use_chat,
        "group_pool": group_pool,
        "groups": {n: len(g) for n, g in prompts.items()},
        "recorded_tokens": recorded,
        **_overlap_metadata(stats),
        "total_neurons": total,
        "sizes": meta_sizes,
    }
    return Discovery(keystone, group_masks, stats.pairwise_iou, stats.iou, scores, total, stats, recorded, responses)


def _check_choices(top_fraction: float, selection: str, positions: str, group_pool: str, rounding: str) -> None:
    """ValueError naming the first of :func:`find_keystone`'s options that is not one it knows."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if group_pool not in GROUP_POOLS:
        raise ValueError(f"group_pool must be one of {GROUP_POOLS}, got {group_pool!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def _group_mask(rec, pooled: dict, n_prompts: int, top_fraction: float, selection: str, rounding: str,
                group_pool: str) -> KeystoneMask:
    """One group's selection: the top of its pooled scores (``"tokens"``), or the intersection of each
    prompt's own top set (``"prompts"``, the paper's way)."""
    if group_pool == "tokens":
        return KeystoneMask(select_top(pooled, top_fraction, selection, rounding))
    per = rec.per_prompt()
    return _intersection([KeystoneMask(select_top({k: v[i] for k, v in per.items()}, top_fraction, selection, rounding))
                          for i in range(n_prompts)])


def _overlap_metadata(stats) -> dict:
    return {"iou": stats.iou, "overlap_vs_single": stats.overlap_vs_single, "pairwise_iou": stats.pairwise_iou,
            "overlap_by_type": {t: {"iou": r.iou, "overlap_vs_single": r.overlap_vs_single}
                                for t, r in stats.by_type.items()}}

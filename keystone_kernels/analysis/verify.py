"""Proving a mask: ablate / scale the weights it owns, and score the model.

The proof a user wants is the gap: zeroing the keystone neurons collapses the model (perplexity up
by orders of magnitude) while zeroing random neurons of the same layout barely matters.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from .. import arch
from ..mask import KeystoneMask
from ..nn.linear import KeystoneLinear
from ..parallel.fsdp import reshard
from ..state import is_sharded


# ---------------------------------------------------------------------------------------- edits
def _editable_rows(model: nn.Module, key: str, sharded: bool) -> tuple[torch.Tensor, int, int]:
    """``(weight, lo, hi)``: the ``[hi - lo, in]`` part of weight ``key`` that this process edits (its global rows
    ``[lo, hi)``): the whole weight, or on a model sharded by ``fully_shard`` this rank's rows of a patched one."""
    try:
        module = model.get_submodule(key)
    except AttributeError:
        module = None
    if isinstance(module, KeystoneLinear):
        return module.local_frozen()
    if sharded:
        raise ValueError(f"{key} is not a projection patched by keystone_kernels.patch; on a sharded model "
                         "scale / ablate edit patched projections only")
    weight, _ = arch.weight_2d(model, key)
    return weight, 0, weight.shape[0]


@contextlib.contextmanager
def scale(model: nn.Module, mask: KeystoneMask, factor: float, modules: dict | None = None) -> Iterator[nn.Module]:
    """Multiply every weight the mask owns by ``factor`` inside the block; restore bit-exactly after.

    Rows own their whole row, columns their entries outside the mask's rows (docs/design.md section 1),
    so each element is scaled once. The mask is validated before anything is touched; the original
    values are restored on exit, also when the block raises. ``factor=0`` is :func:`ablate`.

    On a patched model the frozen weights are edited (the fp32 masters keep their values; the next
    optimizer step or ``sync_frozen`` writes them back). On a model sharded by ``fully_shard`` each
    rank edits the rows it holds.
    """
    indices = mask.weight_indices(model, modules)  # raises before any edit
    sharded = is_sharded(model)
    for m in model.modules():  # an edit of a keystone tensor that no forward has seen yet: scatter it now, or the
        if isinstance(m, KeystoneLinear):  # first forward inside the block would, over the ablated weights
            m.refresh()
    if sharded:
        reshard(model)  # the shards are what the next forward all-gathers
    saved = []
    try:
        with torch.no_grad():
            for key, ind in indices.items():
                weight, lo, hi = _editable_rows(model, key, sharded)
                rows = ind.rows[(ind.rows >= lo) & (ind.rows < hi)] - lo
                rows, cols = rows.to(weight.device), ind.cols.to(weight.device)
                saved.append((weight, rows, weight[rows].clone(), cols, weight[:, cols].clone()))
            for weight, rows, row_vals, cols, col_vals in saved:
                weight[rows] = row_vals * factor if factor != 0 else torch.zeros_like(row_vals)
                outside = ~torch.isin(torch.arange(weight.shape[0], device=weight.device), rows)
                # Rows in R already hold their new values: take the current block, not the saved one.
                new_cols = weight[:, cols]
                new_cols[outside] = col_vals[outside] * factor if factor != 0 else 0
                weight[:, cols] = new_cols
        yield model
    finally:
        with torch.no_grad():
            # Both copies were taken before any edit, so the order of restoring does not matter.
            for weight, rows, row_vals, cols, col_vals in reversed(saved):
                weight[:, cols] = col_vals
                weight[rows] = row_vals
        if sharded:
            reshard(model)


def ablate(model: nn.Module, mask: KeystoneMask, modules: dict | None = None):
    """Zero every weight the mask owns inside the block; restore bit-exactly after."""
    return scale(model, mask, 0.0, modules)


# ---------------------------------------------------------------------------------------- scores
def default_texts() -> list[str]:
    """Held-out plain-English paragraphs (written for this project) for perplexity."""
    text = resources.files("keystone_kernels").joinpath("data/english.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 512,
                        batch_size: int = 8) -> float:
    """Token-weighted perplexity ``exp(sum NLL / tokens)`` of ``texts`` (each truncated to ``max_length``)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    device = _device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for start in range(0, len(texts), batch_size):
            enc = [tokenizer(t)["input_ids"][:max_length] for t in texts[start : start + batch_size]]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, e in enumerate(enc):
                ids[r, : len(e)] = torch.tensor(e)
                attn[r, : len(e)] = 1
            ids, attn = ids.to(device), attn.to(device)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
            targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum",
                                               ignore_index=-100)
            nll += float(loss)
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("texts hold no predictable tokens (each needs at least two tokens)")
    return math.exp(min(nll / count, 700.0))


def _normalize(text: str) -> str:
    return re.sub(r"[\s.,!?;:'\"]+", " ", text.strip().lower()).strip()


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_matches(generated: str, answer: str) -> bool:
    """Numeric answers: the number after "answer is", else the last number of the first line, equals it.
    Other answers: the normalised answer appears as whole words in the first line of the generation
    (a chat model says "The capital of France is Paris.").

    The last number is what a worked answer ends with ("23 + 45 = 68").
    """
    answer = str(answer).strip()
    if _NUMBER.fullmatch(answer.replace(",", "")):
        text = generated.replace(",", "")
        stated = re.search(r"answer is\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE)
        lines = [line for line in text.strip().splitlines() if line.strip()]
        numbers = _NUMBER.findall(lines[0]) if lines else []
        found = stated.group(1) if stated else (numbers[-1] if numbers else None)
        return found is not None and float(found) == float(answer.replace(",", ""))
    lines = [line for line in generated.strip().splitlines() if line.strip()]
    first = _normalize(lines[0]) if lines else ""
    return re.search(rf"(^|\s){re.escape(_normalize(answer))}($|\s)", first) is not None


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, chat: bool = True,
                     batch_size: int = 8) -> list[str]:
    """Greedy completions of ``prompts`` (chat template applied when ``chat``), decoded without special tokens."""
    device = _device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            if chat and getattr(tokenizer, "chat_template", None):
                batch = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                       tokenize=False) for p in batch]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def score_exact_match(model: nn.Module, tokenizer, items: Sequence[dict], max_new_tokens: int = 16, chat: bool = True,
                      batch_size: int = 8) -> float:
    """Accuracy of greedy answers: items are ``{"prompt": str, "answer": str}`` (see :func:`answer_matches`)."""
    if not items:
        raise ValueError("items is empty")
    for i, it in enumerate(items):
        if "prompt" not in it or "answer" not in it:
            raise ValueError(f"item {i} needs 'prompt' and 'answer' fields, got {sorted(it)}")
    answers = generate_answers(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, chat, batch_size)
    return sum(answer_matches(g, it["answer"]) for g, it in zip(answers, items)) / len(items)


@torch.no_grad()
def score_multiple_choice(model: nn.Module, tokenizer, items: Sequence[dict]) -> float:
    """Accuracy of picking the choice with the highest total log-likelihood after the question.

    Items are ``{"question": str, "choices": [str, ...], "answer": int}``.
    """
    if not items:
        raise ValueError("items is empty")
    device = _device(model)
    correct = 0
    for i, it in enumerate(items):
        choices, answer = it.get("choices"), it.get("answer")
        if not choices or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"item {i} needs 'choices' (non-empty) and an 'answer' index into them")
        q_ids = tokenizer(it["question"])["input_ids"]
        scores = []
        for choice in choices:
            c_ids = tokenizer(" " + choice.strip(), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([q_ids + c_ids], device=device)
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float()[0, :-1], -1)
            tgt = ids[0, 1:]
            scores.append(float(logp[torch.arange(len(tgt)), tgt][len(q_ids) - 1 :].sum()))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return correct / len(items)


# ---------------------------------------------------------------------------------------- table
@dataclass
class CollapseRow:
    condition: str
    neurons: int
    perplexity: float
    ratio: float  # perplexity / base perplexity
    weights: int = 0  # weight elements the mask owns (mask.num_parameters(model, include_bias=False))


def collapse_table(
    model: nn.Module,
    tokenizer,
    mask: KeystoneMask,
    texts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    factor: float = 0.0,
    match: str = "weights",
) -> list[CollapseRow]:
    """Perplexity of the base model, with the mask's weights scaled by ``factor`` (0: zeroed), and
    with random masks (one per seed) from ``mask.random_like(seed, model, match)``: by default the same
    neuron count and the same rows / columns per projection, so as many weights are touched."""
    texts = default_texts() if texts is None else texts
    label = "ablated" if factor == 0 else f"scaled x{factor:g}"
    base = evaluate_perplexity(model, tokenizer, texts)
    rows = [CollapseRow("base", 0, base, 1.0)]
    with scale(model, mask, factor):
        ppl = evaluate_perplexity(model, tokenizer, texts)
    rows.append(CollapseRow(f"keystone {label}", mask.num_neurons, ppl, ppl / base,
                            mask.num_parameters(model, include_bias=False)))
    for seed in seeds:
        rnd = mask.random_like(seed, model, match=match)
        with scale(model, rnd, factor):
            ppl = evaluate_perplexity(model, tokenizer, texts)
        rows.append(CollapseRow(f"random {label} (seed {seed})", rnd.num_neurons, ppl, ppl / base,
                                rnd.num_parameters(model, include_bias=False)))
    return rows

"""The paper's decoding for ``positions="generate"``: greedy, its repetition penalty, stop at eos.

The paper's recording script (JxtGTG/keystone ``test_unified_detection.py``, run with temperature 0)
feeds the templated prompt, then at every step takes the argmax of the last position's logits after
a repetition penalty of 1.1 on the ids among the last 64 *generated* ids (the prompt is exempt),
appends the token and runs again, until eos or a new-token limit (16000 in its configuration).

Here generation uses ``model.generate`` with the KV cache (one forward per new token, batched with
left padding) and :class:`PaperRepetitionPenalty`; discovery then records all positions in one
teacher-forced pass (see :func:`keystone_kernels.discovery.record`). A causal model gives every
position the same activations in both, so this equals the paper's step-by-step recording (tested
on tiny models of every family) at a fraction of its cost.
"""

from __future__ import annotations

import time

import torch
from torch import nn

PAPER_REPETITION_PENALTY = 1.1
PAPER_PENALTY_WINDOW = 64
PAPER_MAX_NEW_TOKENS = 16000  # the paper's configuration; our default is 256 (CPU-friendly)
DEFAULT_MAX_NEW_TOKENS = 256


class PaperRepetitionPenalty:
    """Logits processor: the paper's repetition penalty.

    Each distinct id among the last ``window`` generated ids (``input_ids[:, prompt_width:]``; the
    prompt is exempt, unlike Transformers' ``RepetitionPenaltyLogitsProcessor``) has its logit divided
    by ``penalty`` when positive, multiplied when negative, once however often it occurs.
    ``scores``: float ``[B, vocab]``; ``input_ids``: int64 ``[B, prompt_width + generated]``.
    """

    def __init__(self, prompt_width: int, penalty: float = PAPER_REPETITION_PENALTY,
                 window: int = PAPER_PENALTY_WINDOW):
        if penalty <= 0 or window < 0:
            raise ValueError(f"repetition penalty must be > 0 and window >= 0, got {penalty}, {window}")
        self.prompt_width, self.penalty, self.window = prompt_width, penalty, window

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width:]
        recent = generated[:, max(0, generated.shape[1] - self.window):]
        if recent.shape[1] == 0 or self.penalty == 1.0:
            return scores
        # gather before scatter: a repeated id reads and writes the same penalised value, so once
        picked = scores.gather(1, recent)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, recent, picked)


class _TokenProgress:
    """Streamer for ``generate``: advances ``bar`` by the rows still generating at each step."""

    def __init__(self, bar, stop_ids: list[int], rows: int):
        self.bar, self.stop = bar, torch.tensor(stop_ids, dtype=torch.long)
        self.done = torch.zeros(rows, dtype=torch.bool)
        self.started = False
        self.t0 = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the first call hands over the prompt
            self.started = True
            return
        tokens = value.reshape(-1).cpu()
        self.bar.update(int((~self.done).sum()))
        self.done |= torch.isin(tokens, self.stop)

    def end(self) -> None:
        pass


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Ids that end a response: the tokenizer's eos and the model's generation-config eos (int or list)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(int(i) for i in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    return sorted(ids)


def _left_padded(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):
        ids[r, width - len(x):] = torch.tensor(x)
        mask[r, width - len(x):] = 1
    return ids.to(device), mask.to(device)


def _cut_at_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer,
    encoded: list[list[int]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress=None,
    repetition_penalty: float = PAPER_REPETITION_PENALTY,
    penalty_window: int = PAPER_PENALTY_WINDOW,
) -> list[list[int]]:
    """Greedy responses to token-id prompts, the paper's way (see the module docstring).

    Args:
        encoded: one list of token ids per prompt (chat template already applied if wanted).
        max_new_tokens: at most this many new tokens per prompt (the paper used 16000).
        progress: a tqdm bar, advanced by one per generated token (it shows tokens/s).

    Returns:
        One list of new token ids per prompt, ending with the first stop id (see
        :func:`stop_token_ids`) when one came before the limit; never empty.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    stop = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    device = next(model.parameters()).device
    # Explicit neutral values: None would be filled in from the model's own generation config.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_new_tokens=0, eos_token_id=stop or None, pad_token_id=pad_id)
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            ids, mask = _left_padded(batch, pad_id, device)
            penalty = PaperRepetitionPenalty(ids.shape[1], repetition_penalty, penalty_window)
            streamer = _TokenProgress(progress, stop, len(batch)) if progress is not None else None
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                  logits_processor=LogitsProcessorList([penalty]), streamer=streamer)
            for row in seqs[:, ids.shape[1]:].tolist():
                out.append(_cut_at_stop(row, set(stop)))
    finally:
        model.train(was_training)
    return out

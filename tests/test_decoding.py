"""positions="generate": the paper's decoding, and cached generation + one teacher-forced pass equal
to the paper's step-by-step recording (a full forward per new token, position -1 recorded)."""

import pytest
import torch
from tiny import FAMILY_CONFIGS, PROMPTS, tiny_model, tiny_tokenizer

from keystone_kernels.analysis.decoding import PaperRepetitionPenalty, stop_token_ids
from keystone_kernels.analysis.discovery import _encode, collect_activations, record

PENALTY, WINDOW = 1.1, 64


def test_repetition_penalty_by_hand():
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    ids = torch.tensor([[3, 4, 1, 1, 2]])  # prompt [3, 4] is exempt; generated [1, 1, 2]
    out = PaperRepetitionPenalty(prompt_width=2, penalty=2.0)(ids, scores.clone())
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0, 0.25, 3.0, -2.0]]), rtol=0, atol=0)  # once per id


def test_repetition_penalty_window_holds_the_last_64_generated_ids():
    scores = torch.tensor([[1.0, 1.0, 1.0]])
    ids = torch.tensor([[2] + [0] + [1] * 64])  # prompt [2]; id 0 is 65 generated tokens back
    out = PaperRepetitionPenalty(prompt_width=1)(ids, scores.clone())
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0 / 1.1, 1.0]]))
    with pytest.raises(ValueError, match="penalty must be > 0"):
        PaperRepetitionPenalty(1, penalty=0.0)


def _paper_loop(model, prompt_ids, max_new, stop):
    """The paper's loop, written out: returns the new ids and each step's input (its last token is recorded)."""
    seq, new, inputs = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(max_new):
            inputs.append(list(seq))
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            for t in set(new[-WINDOW:]):
                logits[t] = logits[t] * PENALTY if logits[t] < 0 else logits[t] / PENALTY
            token = int(logits.argmax())
            new.append(token)
            if token in stop:
                break
            seq.append(token)
    return new, inputs


class _Counter:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_generate_equals_step_by_step_recording(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    prompts = [PROMPTS["b"][0], PROMPTS["c"][1], PROMPTS["a"][2]]  # different lengths: batches are padded
    encoded = _encode(tok, prompts, True, 512)  # chat template: what chat=None (auto) does for "generate"
    max_new = 6
    # make the first prompt stop early: the first token it makes that it had not made before becomes an eos
    first, _ = _paper_loop(model, encoded[0], max_new, set())
    fresh = [i for i in range(1, max_new - 1) if first[i] not in first[:i]]
    if fresh:  # a degenerate tiny model repeating one token has none
        tok.eos_token = tok.convert_ids_to_tokens(first[fresh[0]])
    stop = set(stop_token_ids(model, tok))
    runs = [_paper_loop(model, p, max_new, stop) for p in encoded]
    bar = _Counter()
    rec = record(model, tok, prompts, types="all", positions="generate", batch_size=2, max_new_tokens=max_new,
                 progress=bar)
    assert rec.responses == [new for new, _ in runs]
    assert rec.tokens == [len(new) for new, _ in runs] and bar.n == sum(rec.tokens)
    if fresh:
        assert len(rec.responses[0]) == fresh[0] + 1 < max_new
    per_prompt = rec.per_prompt()
    for i, (_, inputs) in enumerate(runs):
        want = collect_activations(model, tok, inputs, types="all", positions="last", batch_size=4)
        for key, value in want.items():
            torch.testing.assert_close(per_prompt[key][i], value, rtol=1e-4, atol=1e-5, msg=f"{family} {key}")
    pooled = collect_activations(model, tok, [x for _, inputs in runs for x in inputs], types="all", positions="last")
    for key, value in pooled.items():
        torch.testing.assert_close(rec.pooled()[key], value, rtol=1e-4, atol=1e-5)


def test_generate_refuses_a_bad_token_limit():
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        record(tiny_model("llama"), tiny_tokenizer(), ["hi"], positions="generate", max_new_tokens=0)

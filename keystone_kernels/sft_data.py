"""Supervised fine-tuning data: local files -> token ids with the loss on response tokens only.

Rows are either ``{"prompt": str, "response": str}`` or chat ``{"messages": [{"role", "content"}, ...]}``
(loss on every assistant turn). Files: JSONL / JSON / CSV / Parquet, read with ``datasets`` from
local paths only. When the tokenizer has a chat template it is applied (``chat=None`` = auto).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a local JSONL / JSON / CSV / Parquet file (via ``datasets``), as dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported format {path.suffix!r}; use one of {', '.join(_FORMATS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    if kind == "json" and path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for malformed files
        raise ValueError(f"{path}: cannot read as {kind}: {err}") from None
    if len(ds) == 0:
        raise ValueError(f"{path} holds no rows")
    rows = ds.to_list()
    if kind == "csv":  # CSV has no types: a response "18" must stay text, not become the number 18
        rows = [{k: (v if v is None or isinstance(v, str) else str(v)) for k, v in r.items()} for r in rows]
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; blank lines are skipped; a bad line is named by its number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                                 "JSONL needs one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: a JSONL row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows (only blank lines)")
    return rows


def _check_row(i: int, row: dict) -> list[dict]:
    """The row as a list of chat messages (prompt/response rows become user/assistant turns)."""
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
            raise ValueError(f"row {i}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"row {i}: 'messages' has no assistant turn to learn from")
        return msgs
    missing = [k for k in ("prompt", "response") if row.get(k) is None]
    if missing:
        raise ValueError(f"row {i}: missing field(s) {missing}; "
                         "rows need 'prompt' and 'response' strings, or 'messages'")
    for k in ("prompt", "response"):
        if not isinstance(row[k], str):
            raise ValueError(f"row {i}: field {k!r} is {type(row[k]).__name__} ({row[k]!r}), not a string; "
                             f"quote it in the data file (\"{k}\": \"{row[k]}\")")
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_messages(tokenizer, messages: Sequence[dict], chat: bool) -> Example:
    """Token ids of a conversation; labels on assistant content (and its end-of-turn tokens)."""
    if chat:
        ids: list[int] = []
        labels: list[int] = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = _ids(tokenizer, tokenizer.apply_chat_template(list(messages[:i]), tokenize=False,
                                                                   add_generation_prompt=True))
            upto = _ids(tokenizer, tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False))
            if upto[: len(before)] != before or before[: len(ids)] != ids:
                raise ValueError("the chat template does not render conversations prefix by prefix; "
                                 "use prompt/response rows")
            labels += [IGNORE] * (len(before) - len(ids)) + upto[len(before) :]
            ids = upto
        return Example(ids, labels)
    prompt = "".join(m["content"] + "\n" for m in messages if m["role"] != "assistant")
    response = next(m["content"] for m in messages if m["role"] == "assistant")
    p_ids = tokenizer(prompt)["input_ids"]  # with BOS where the tokenizer adds one
    r_ids = _ids(tokenizer, response) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return Example(p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids)


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized examples. ``truncated`` counts rows cut to ``max_length`` (a warning says so)."""

    def __init__(self, rows: Sequence[dict], tokenizer, max_length: int = 256, chat: bool | None = None):
        if not rows:
            raise ValueError("no rows")
        chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template")
        self.examples: list[Example] = []
        self.truncated = 0
        self.rows = list(rows)
        empty = []  # rows whose every response is empty: they teach only "stop at once"
        for i, row in enumerate(self.rows):
            messages = _check_row(i, row)
            if all(not str(m["content"]).strip() for m in messages if m["role"] == "assistant"):
                empty.append(i)
            ex = encode_messages(tokenizer, messages, chat)
            if len(ex.input_ids) > max_length:
                self.truncated += 1
                ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
            if all(label == IGNORE for label in ex.labels):
                raise ValueError(f"row {i}: no response token left after truncation to max_length={max_length}")
            self.examples.append(ex)
        if len(empty) == len(self.rows):
            raise ValueError(f"every one of the {len(self.rows)} rows has an empty response: there is nothing to learn "
                             "(is the response field misnamed, or the file a prompts-only file?)")
        if empty:
            warnings.warn(f"{len(empty)} of {len(self.rows)} rows have an empty response (first: row {empty[0]}); they "
                          "teach the model to stop at once", stacklevel=2)
        if self.truncated:
            warnings.warn(f"{self.truncated} of {len(self.rows)} rows were longer than max_length={max_length} "
                          "and were truncated", stacklevel=2)
        self.chat = chat

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def load_sft_dataset(path: str | os.PathLike, tokenizer, max_length: int = 256, chat: bool | None = None) -> SFTDataset:
    return SFTDataset(read_rows(path), tokenizer, max_length, chat)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids / attention_mask / labels, each ``[B, S]`` int64."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: Sequence[Example], block: int) -> list[Example]:
    """Concatenate examples into blocks of ``block`` tokens (the last one may be shorter)."""
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
    return [Example(ids[i : i + block], labels[i : i + block]) for i in range(0, len(ids), block)]

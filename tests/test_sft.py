"""SFT data (formats, masking, errors), the training loop (modes, resume), shipped tasks."""

import json

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from keystone_kernels import KeystoneMask, keystone_parameters, load_adapter
from keystone_kernels.serialization.adapter import read_adapter
from keystone_kernels.sft import SFTConfig, batch_indices, latest_checkpoint, train
from keystone_kernels.sft_data import IGNORE, SFTDataset, collate, load_sft_dataset, pack, read_rows
from keystone_kernels.tasks import addition_problems, multistep_problems, shipped_path, write_shipped

ROWS = [{"prompt": f"{a} plus {b}?", "response": f"{a + b}"}
        for a, b in [(1, 2), (30, 4), (7, 18), (12, 12), (5, 60), (9, 9)]]
MASK = {("attn_q", 0, None): [1, 5], ("attn_o", 1, None): [2], ("fwd_up", 1, None): [0, 9], ("fwd_down", 0, None): [3]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"rows.{fmt}"
    _write(path, ROWS, fmt)
    assert read_rows(path) == ROWS


@pytest.mark.parametrize("chat", [False, True])
def test_loss_only_on_response_tokens(tok, chat):
    ds = SFTDataset(ROWS, tok, chat=chat)
    for row, ex in zip(ROWS, ds):
        assert len(ex.input_ids) == len(ex.labels)
        learned = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
        assert all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels))
        text = tok.decode(learned)
        assert text.startswith(row["response"]) and row["prompt"] not in text
        assert ex.labels[0] == IGNORE


def test_chat_messages_learn_every_assistant_turn(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ex = SFTDataset([{"messages": msgs}], tok, chat=True)[0]
    learned = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert "hello" in learned and "4" in learned and "2+2?" not in learned and "hi\n" not in learned


def test_collate_pads_right_and_packing_keeps_tokens(tok):
    ds = SFTDataset(ROWS, tok, chat=False)
    batch = collate([ds[0], ds[4]], pad_id=tok.pad_token_id)
    lengths = [len(ds[0].input_ids), len(ds[4].input_ids)]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    blocks = pack(list(ds), 16)
    assert sum(len(b.input_ids) for b in blocks) == ds.num_tokens() and all(len(b.input_ids) <= 16 for b in blocks)


def test_truncation_warns_with_a_count(tok):
    rows = ROWS + [{"prompt": "x" * 10, "response": "a long answer that will not fit"}]
    with pytest.warns(UserWarning, match="1 of 7 rows were longer than max_length=40"):
        ds = SFTDataset(rows, tok, max_length=40, chat=False)
    assert ds.truncated == 1 and len(ds[6].input_ids) == 40


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a"}], r"row 0: missing field\(s\) \['response'\]"),
        ([{"question": "a", "answer": "b"}], r"row 0: missing field\(s\) \['prompt', 'response'\]"),
        ([{"messages": [{"role": "user", "content": "a"}]}], "row 0: 'messages' has no assistant turn"),
        ([{"messages": "hello"}], "row 0: 'messages' must be a non-empty list"),
        ([], "no rows"),
    ],
)
def test_bad_rows(tok, rows, message):
    with pytest.raises(ValueError, match=message):
        SFTDataset(rows, tok)


def test_bad_files(tmp_path, tok):
    with pytest.raises(FileNotFoundError):
        load_sft_dataset(tmp_path / "missing.jsonl", tok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_sft_dataset(tmp_path / "empty.jsonl", tok)
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported format '.txt'"):
        load_sft_dataset(tmp_path / "rows.txt", tok)
    with pytest.raises(ValueError, match="no response token left"):
        SFTDataset([{"prompt": "y" * 60, "response": "z"}], tok, max_length=10, chat=False)


def test_batches_are_a_function_of_seed_and_step():
    seen = [i for step in range(3) for i in batch_indices(10, 3, seed=4, index=step)]
    assert len(set(seen)) == 9  # one epoch: no repeats
    assert (batch_indices(10, 3, 4, 7) == batch_indices(10, 3, 4, 7)
            and batch_indices(10, 3, 4, 1) != batch_indices(10, 3, 5, 1))


def test_keystone_training_lowers_the_loss_and_trains_only_keystone(tok, tmp_path):
    model = tiny_model("llama")
    frozen_before = {n: p.clone() for n, p in model.named_parameters()}
    ds = SFTDataset(ROWS, tok)
    result = train(model, tok, KeystoneMask(MASK), ds, SFTConfig(steps=12, lr=1e-2, batch_size=3, backend="reference"),
                   tmp_path / "out", progress=False)
    assert len(result.losses) == 12 and min(result.losses[-3:]) < result.losses[0]
    assert result.trainable_parameters == KeystoneMask(MASK).num_parameters(tiny_model("llama"))
    n_tensors = len(keystone_parameters(model))  # exp_avg + exp_avg_sq in fp32, plus a 4-byte step per tensor
    assert result.optimizer_state_bytes == 2 * 4 * result.trainable_parameters + 4 * n_tensors
    for name, p in model.named_parameters():
        if not name.endswith(("weight_rows", "weight_cols", "bias_rows")):
            assert torch.equal(p, frozen_before[name]), name  # embeddings, norms: untouched
    fresh = load_adapter(tiny_model("llama"), tmp_path / "out" / "keystone_adapter.safetensors")
    for a, b in zip(keystone_parameters(fresh), keystone_parameters(model)):
        assert torch.equal(a, b)


def test_random_and_full_modes(tok):
    ds = SFTDataset(ROWS, tok)
    rnd = train(tiny_model("llama"), tok, KeystoneMask(MASK), ds,
                SFTConfig(mode="random", steps=3, batch_size=2, backend="reference"), progress=False)
    assert rnd.trainable_parameters == KeystoneMask(MASK).num_parameters(tiny_model("llama"))
    model = tiny_model("llama")
    full = train(model, tok, None, ds, SFTConfig(mode="full", steps=3, batch_size=2), progress=False)
    assert full.trainable_parameters == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="needs a mask"):
        train(tiny_model("llama"), tok, None, ds, SFTConfig(steps=1), progress=False)


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tok, tmp_path):
    ds = SFTDataset(ROWS, tok)
    config = SFTConfig(steps=8, lr=5e-3, batch_size=2, grad_accum=2, save_every=3, backend="reference")
    train(tiny_model("llama"), tok, KeystoneMask(MASK), ds, config, tmp_path / "straight", progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_checkpoint(step, _loss):
        if step == 4:  # checkpoint at 3 exists, step 4 is lost
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_model("llama"), tok, KeystoneMask(MASK), ds, config, tmp_path / "resumed", progress=False,
              on_step=stop_after_checkpoint)
    state = json.loads((latest_checkpoint(tmp_path / "resumed") / "state.json").read_text())
    assert state["step"] == 3
    result = train(tiny_model("llama"), tok, None, ds, config, tmp_path / "resumed", resume=True, progress=False)
    assert result.resumed_from == 3 and len(result.losses) == 8
    # compared as tensors + metadata: safetensors writes its metadata map in no fixed order
    a, meta_a = read_adapter(tmp_path / "straight" / "keystone_adapter.safetensors")
    b, meta_b = read_adapter(tmp_path / "resumed" / "keystone_adapter.safetensors")
    assert meta_a == meta_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_matches_eager_and_resumes(tok, tmp_path):
    """``SFTConfig(compile=True)`` (``sft --compile``): the model under inductor and the optimizer's compiled
    capturable step give the eager run's losses and adapter, and its checkpoints (a tensor lr in the optimizer
    and scheduler state) resume."""
    ds = SFTDataset(ROWS, tok)
    settings = dict(steps=4, lr=5e-3, batch_size=2, save_every=2, backend="reference")
    eager = train(tiny_model("llama"), tok, KeystoneMask(MASK), ds, SFTConfig(**settings), tmp_path / "eager",
                  progress=False)
    torch.compiler.reset()
    compiled = train(tiny_model("llama"), tok, KeystoneMask(MASK), ds, SFTConfig(**settings, compile=True),
                     tmp_path / "compiled", progress=False)
    assert compiled.skipped_steps == 0
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5)
    a, _ = read_adapter(tmp_path / "eager" / "keystone_adapter.safetensors")
    b, _ = read_adapter(tmp_path / "compiled" / "keystone_adapter.safetensors")
    assert a.keys() == b.keys() and all(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    longer = SFTConfig(**{**settings, "steps": 6}, compile=True)
    resumed = train(tiny_model("llama"), tok, None, ds, longer, tmp_path / "compiled", resume=True, progress=False)
    assert resumed.resumed_from == 2 and len(resumed.losses) == 6


def test_config_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        SFTConfig(mode="adapter")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SFTConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        SFTConfig(lr=-1)


def test_shipped_tasks_are_reproducible_and_disjoint(tmp_path):
    write_shipped(tmp_path)
    for name in ("arith-train", "arith-eval", "multistep-train", "multistep-eval", "qa"):
        assert (tmp_path / shipped_path(name).name).read_bytes() == shipped_path(name).read_bytes(), name
    train_rows, eval_rows = addition_problems()
    assert len(train_rows) == 2000 and len(eval_rows) == 100
    def pairs(rows):
        return {tuple(int(x) for x in r["response"].split(" = ")[0].split(" + ")) for r in rows}

    assert not pairs(train_rows) & pairs(eval_rows)
    for r in train_rows[:50] + multistep_problems()[1][:50]:
        assert r["response"].endswith(r["answer"])

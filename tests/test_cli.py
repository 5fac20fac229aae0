"""The CLI end to end on a tiny saved model (no downloads): find, verify, sft (+ resume), compare, demo."""

import json

import pytest
from tiny import FAMILY_CONFIGS, tiny_model, tiny_tokenizer, write_sft_files

from keystone_kernels.cli import main
from keystone_kernels.sft import latest_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sft_files(tmp_path_factory.mktemp("data"))


def test_find_and_verify(tiny_dir, tmp_path, capsys):
    mask = tmp_path / "mask.json"
    assert main(["find", "--model", tiny_dir, "--top-fraction", "0.05", "--out", str(mask)]) == 0
    assert ("keystone neurons:" in capsys.readouterr().out
            and json.loads(mask.read_text())["__metadata__"]["top_fraction"] == 0.05)
    assert main(["verify", "--model", tiny_dir, "--mask", str(mask), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "keystone ablated" in out and "random ablated (seed 1)" in out


def test_find_generate_writes_the_papers_layout_and_verify_prints_the_overlap(tiny_dir, tmp_path, capsys):
    mask = tmp_path / "paper.json"
    assert main(["find", "--model", tiny_dir, "--top-fraction", "0.05", "--positions", "generate",
                 "--max-new-tokens", "3", "--group-pool", "prompts", "--paper-compatible", "--out", str(mask)]) == 0
    out = capsys.readouterr().out
    assert "overlap vs single" in out and "recorded tokens per group" in out and "pairwise IoU" in out
    assert "__metadata__" not in json.loads(mask.read_text())
    meta = json.loads((tmp_path / "paper.meta.json").read_text())
    assert meta["positions"] == "generate" and meta["max_new_tokens"] == 3 and meta["chat"] is True
    assert main(["verify", "--model", tiny_dir, "--mask", str(mask), "--seeds", "1", "--no-chat"]) == 0
    out = capsys.readouterr().out
    assert "IoU over all groups" in out and "weights" in out and "random ablated (seed 0)" in out


def test_bad_arguments_exit_2_with_a_message(tiny_dir, tmp_path, capsys):
    assert main(["verify", "--model", tiny_dir, "--mask", str(tmp_path / "none.json")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["find", "--model", str(tmp_path / "no_model")]) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_sft_writes_adapter_metrics_and_resumes(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_dir, "--data", str(data / "train.jsonl"), "--eval", str(data / "eval.jsonl"),
            "--top-fraction", "0.05", "--steps", "4", "--batch-size", "3", "--save-every", "2", "--output", str(out),
            "--backend", "reference"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["mode"] == "keystone" and len(metrics["losses"]) == 4
            and set(metrics["after"]) == {"accuracy", "perplexity", "qa_accuracy"})
    assert (out / "keystone_adapter.safetensors").is_file() and (latest_checkpoint(out) / "state.json").is_file()
    assert "before" in capsys.readouterr().out
    assert main(args[:-4] + ["--steps", "6", "--output", str(out), "--resume", "--no-eval", "--merge",
                             "--backend", "reference"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 6
    assert (out / "merged" / "config.json").is_file()


def test_compare_and_demo(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", tiny_dir, "--data", str(data / "train.jsonl"),
                 "--eval", str(data / "eval.jsonl"), "--top-fraction", "0.05", "--steps", "2", "--batch-size", "2",
                 "--lrs-keystone", "1e-3", "--lrs-random", "1e-3", "--lrs-lora", "1e-3", "--lrs-full", "1e-5",
                 "--output", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert [r["mode"] for r in report["runs"]] == ["keystone", "random", "lora", "full"] and len(report["summary"]) == 4
    assert (out / "tradeoff.png").stat().st_size > 0 and "matched acc" in capsys.readouterr().out
    demo = tmp_path / "demo"
    assert main(["demo", "--model", tiny_dir, "--data", str(data / "train.jsonl"), "--eval", str(data / "eval.jsonl"),
                 "--steps", "2", "--batch-size", "2", "--top-fraction", "0.05", "--output", str(demo)]) == 0
    printed = capsys.readouterr().out
    assert "keystone ablated" in printed and "optimizer state" in printed
    assert (demo / "loss_curves.png").stat().st_size > 0 and (demo / "keystone_mask.json").is_file()


# ---------------------------------------------------------------------------------------- an honest resume
def _sft_args(tiny_dir, data, out, *extra):
    return ["sft", "--model", tiny_dir, "--data", str(data / "train.jsonl"), "--no-eval", "--top-fraction", "0.05",
            "--batch-size", "3", "--save-every", "2", "--output", str(out), "--backend", "reference", *extra]


@pytest.fixture(scope="module")
def started_run(tiny_dir, data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 (kept) and the mask it found, to resume from."""
    out = tmp_path_factory.mktemp("started") / "run"
    assert main(_sft_args(tiny_dir, data, out, "--steps", "4", "--seed", "3")) == 0
    return out


@pytest.mark.parametrize("change,listed", [
    (["--lr", "0.5"], "learning_rate: 0.001 in the checkpoint, 0.5 now"),
    (["--seed", "4"], "seed: 3 in the checkpoint, 4 now"),
    (["--batch-size", "2"], "batch_size: 3 in the checkpoint, 2 now"),
    (["--top-fraction", "0.2"], "top_fraction: 0.05 in the checkpoint, 0.2 now"),
    (["--max-length", "26"], "training data:"),
    (["--mask", "OTHER"], "mask: not the mask the checkpoint was trained with"),
])
def test_resume_with_other_settings_is_an_error_listing_them(started_run, tiny_dir, data, tmp_path, capsys, change,
                                                             listed):
    import shutil

    from keystone_kernels.mask import KeystoneMask

    run = tmp_path / "run"
    shutil.copytree(started_run, run)
    if change[-1] == "OTHER":
        KeystoneMask({("attn_q", 0, None): [1, 2]}).to_json(tmp_path / "other.json")
        change = ["--mask", str(tmp_path / "other.json")]
    args = _sft_args(tiny_dir, data, run, "--steps", "6", "--seed", "3", "--resume") + change
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "this run differs from the one in" in err and listed in err, err
    assert json.loads((latest_checkpoint(run) / "state.json").read_text())["step"] == 2  # nothing trained


def test_resume_with_the_same_settings_and_its_own_mask_continues(started_run, tiny_dir, data, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(started_run, run)
    mask = tmp_path / "mask.json"
    from keystone_kernels.mask import KeystoneMask
    from keystone_kernels.serialization.adapter import read_adapter

    _, meta = read_adapter(latest_checkpoint(run) / "adapter.safetensors")
    KeystoneMask.from_dict(json.loads(meta["mask"])).to_json(mask)
    assert main(_sft_args(tiny_dir, data, run, "--steps", "6", "--seed", "3", "--resume", "--mask", str(mask))) == 0
    assert len(json.loads((run / "metrics.json").read_text())["losses"]) == 6


def test_a_new_run_into_the_folder_of_a_longer_run_moves_its_checkpoints_aside(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    assert main(_sft_args(tiny_dir, data, out, "--steps", "9")) == 0  # checkpoints up to step 8
    with pytest.warns(UserWarning, match=r"held the checkpoints of an earlier run \(newest: step-00000008.*moved to"):
        assert main(_sft_args(tiny_dir, data, out, "--steps", "5")) == 0  # a new run: checkpoint at 4
    aside = [p for p in out.iterdir() if p.name.startswith("checkpoints.previous-")]
    assert len(aside) == 1 and json.loads((latest_checkpoint(out) / "state.json").read_text())["step"] == 4
    assert main(_sft_args(tiny_dir, data, out, "--steps", "6", "--resume")) == 0
    losses = json.loads((out / "metrics.json").read_text())["losses"]
    assert len(losses) == 6  # this run's step 4 continued, not the earlier run's step 8


def test_output_that_is_a_file_or_not_writable_fails_before_training(tiny_dir, data, tmp_path, capsys, monkeypatch):
    import tempfile

    afile = tmp_path / "afile"
    afile.write_text("x")
    capsys.readouterr()
    assert main(_sft_args(tiny_dir, data, afile, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert f"--output {afile} is a file, not a folder" in err and "Traceback" not in err
    assert err.count("\n") == 1

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert main(_sft_args(tiny_dir, data, tmp_path / "ro", "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert f"--output {tmp_path / 'ro'} is not writable (Read-only file system)" in err and "sft[" not in err


def test_a_full_disk_while_writing_a_checkpoint_names_it_and_keeps_the_last_one(tiny_dir, data, tmp_path, capsys,
                                                                                   monkeypatch):
    import torch

    real, calls = torch.save, []

    def full_after_two(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 2:  # the first checkpoint (optimizer.pt, scheduler.pt) goes through
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; basic_ios::clear: "
                               "iostream error")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_after_two)
    out = tmp_path / "run"
    assert main(_sft_args(tiny_dir, data, out, "--steps", "6")) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 4 under" in err and "iostream error" in err
    assert "the last complete checkpoint" in err and "step-00000002" in err and "--resume" in err
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["step"] == 2


MOE_FAMILIES = ("mixtral", "qwen3_moe")


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_too_long_responses_are_cut_to_the_context_on_every_family(family, tmp_path, monkeypatch):
    from keystone_kernels import commands

    config = FAMILY_CONFIGS[family]()
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    assert context == 64  # far below the CLI's --max-length of 256, so the cut must happen
    model_dir = tmp_path / family
    tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rows = [{"prompt": f"{a}+{a}=", "response": "long " * 30 + str(2 * a)} for a in range(6)]  # ~160 tokens each
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets = []
    load = commands.load_sft_dataset
    monkeypatch.setattr(commands, "load_sft_dataset", lambda *a, **k: datasets.append(load(*a, **k)) or datasets[-1])
    args = ["sft", "--model", str(model_dir), "--data", str(tmp_path / "long.jsonl"), "--no-eval", "--steps", "2",
            "--batch-size", "2", "--output", str(tmp_path / "run"), "--backend", "reference"]
    if family in MOE_FAMILIES:  # sft cannot patch expert weights yet: a mask of attention neurons only
        (tmp_path / "mask.json").write_text(json.dumps({"attn_q": {"0": [1, 5, 17], "1": [2]}, "attn_o": {"1": [3]}}))
        args += ["--mask", str(tmp_path / "mask.json")]
    else:
        args += ["--top-fraction", "0.05"]
    with pytest.warns(UserWarning) as caught:
        assert main(args) == 0
    messages = [str(w.message) for w in caught]
    assert any("max_length=256 is longer than the model's context of 64 tokens" in m for m in messages), messages
    assert any("6 of 6 rows were longer than max_length=64 and were truncated" in m for m in messages), messages
    (dataset,) = datasets
    assert [len(e.input_ids) for e in dataset.examples] == [context] * len(rows)  # cut to the context, not beyond
    assert all(any(label != -100 for label in e.labels) for e in dataset.examples)  # response tokens left to learn
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["losses"]) == 2


def test_data_with_nothing_to_learn_is_an_error_before_training(tiny_dir, tmp_path, capsys):
    rows = [{"prompt": f"{a}+{a}=", "response": ""} for a in range(6)]
    (tmp_path / "empty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sft", "--model", tiny_dir, "--data", str(tmp_path / "empty.jsonl"), "--no-eval", "--steps", "2",
            "--output", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "every one of the 6 rows has an empty response: there is nothing to learn" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such folder"),
    ("file", "it is a file, not a folder"),
    ("no config", "the folder has no config.json"),
])
def test_model_errors_name_the_path_and_what_is_wrong(tmp_path, capsys, kind, message):
    path = tmp_path / "model"
    if kind == "file":
        path.write_text("weights?")
    elif kind == "no config":
        path.mkdir()
        (path / "model.safetensors").write_text("")
    assert main(["find", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot load model {str(path)!r}: {message}" in err


@pytest.mark.parametrize("damage", ["truncated optimizer.pt", "broken state.json", "truncated adapter"])
def test_a_checkpoint_that_does_not_load_is_named_and_the_previous_one_is_used(tiny_dir, data, tmp_path, capsys,
                                                                                damage):
    out = tmp_path / "run"
    assert main(_sft_args(tiny_dir, data, out, "--steps", "5")) == 0  # checkpoints at steps 2 and 4
    newest = latest_checkpoint(out)
    assert json.loads((newest / "state.json").read_text())["step"] == 4
    name = {"truncated optimizer.pt": "optimizer.pt", "broken state.json": "state.json",
            "truncated adapter": "adapter.safetensors"}[damage]
    raw = (newest / name).read_bytes()
    (newest / name).write_bytes(raw[: len(raw) // 2] if name != "state.json" else b'{"step": 4, "losses": [')
    with pytest.warns(UserWarning, match=f"skipping a checkpoint that does not load: .*{newest.name}"):
        assert main(_sft_args(tiny_dir, data, out, "--steps", "6", "--resume")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 6  # resumed from step 2: 4 more steps run

"""The CLI end to end on a tiny saved model (no downloads): find, verify, sft (+ resume), compare, demo."""

import json

import pytest
from tiny import tiny_model, tiny_tokenizer, write_sft_files

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

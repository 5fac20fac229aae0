"""The shipped data sets: names resolve to files, a shipped train set finds its eval set."""

import json

import pytest

from keystone_kernels.tasks import SHIPPED, eval_items, resolve_data, shipped_path


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_name_resolves_to_a_readable_file(name):
    path = resolve_data(name)
    assert path == str(shipped_path(name))
    with open(path, encoding="utf-8") as f:
        assert json.loads(f.readline())  # a JSONL row


def test_a_path_is_left_as_it_is(tmp_path):
    assert resolve_data(str(tmp_path / "mine.jsonl")) == str(tmp_path / "mine.jsonl")


@pytest.mark.parametrize("train", ["arith-train", "multistep-train"])
def test_a_shipped_train_set_pairs_with_its_eval_set(train):
    items = eval_items(train)
    with open(shipped_path(train.replace("-train", "-eval")), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [i["prompt"] for i in items] == [r["prompt"] for r in rows]
    assert [i["answer"] for i in items] == [r["answer"] for r in rows]
    assert items and all(set(i) == {"prompt", "answer"} for i in items)


def test_an_eval_file_wins_and_answer_falls_back_to_response(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"prompt": "2 + 3 =", "answer": "5"}, {"prompt": "7 + 4 =", "response": "11", "extra": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert eval_items("arith-train", str(path)) == [{"prompt": "2 + 3 =", "answer": "5"},
                                                   {"prompt": "7 + 4 =", "answer": "11"}]


def test_a_training_file_without_an_eval_set_gives_none(tmp_path):
    assert eval_items(str(tmp_path / "train.jsonl")) == []

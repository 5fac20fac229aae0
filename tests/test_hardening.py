"""What a new user broke (issue 12): damaged files, dead models, mismatched state, pickling."""

from __future__ import annotations

import copy
import gc
import pickle
import struct
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model

from keystone_kernels import KeystoneAdamW, keystone_parameters, load_adapter, patch, save_adapter
from keystone_kernels.mask import KeystoneMask

MASK = KeystoneMask({("attn_q", 0, None): [1, 7], ("fwd_up", 1, None): [0, 70], ("attn_o", 1, None): [3]})


def _trained(seed: int = 0, mask: KeystoneMask = MASK, frozen_dtype=torch.bfloat16, steps: int = 1, lr: float = 1e-2,
             ids: torch.Tensor | None = None):
    """A patched tiny Llama and its optimizer after ``steps`` steps on ``ids`` (default: random [2, 7])."""
    model = patch(tiny_model("llama", seed=seed), mask, frozen_dtype=frozen_dtype, backend="reference")
    opt = KeystoneAdamW(keystone_parameters(model), lr=lr, backend="reference")
    if ids is None:
        ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model, opt


@pytest.fixture
def adapter(tmp_path):
    model, _ = _trained()
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    return path


def test_a_flipped_payload_bit_is_refused(adapter):
    raw = bytearray(adapter.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    raw[8 + header + 5] ^= 0x10  # a bit inside the first tensor's bytes
    adapter.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="do not match the adapter's checksum"):
        load_adapter(tiny_model("llama"), adapter, backend="reference")


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_nan_values_are_refused(adapter):
    from keystone_kernels.serialization.adapter import adapter_checksum

    tensors = load_file(adapter)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    meta = _metadata(adapter)
    meta["checksum"] = adapter_checksum(tensors, meta)  # a consistent file whose values are NaN
    save_file(tensors, adapter, metadata=meta)
    with pytest.raises(ValueError, match=f"tensor '{name}' holds NaN or Inf"):
        load_adapter(tiny_model("llama"), adapter, backend="reference")


@pytest.mark.parametrize("field,value,message", [
    ("frozen_dtype", "torch.int8", "frozen_dtype is 'torch.int8'"),
    ("mask", None, "metadata lacks mask"),
    ("base_fingerprint", None, "metadata lacks base_fingerprint"),
    ("mask", "{not json", "mask metadata is not valid JSON"),
])
def test_tampered_metadata_is_refused(adapter, field, value, message):
    meta = _metadata(adapter)
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    save_file(load_file(adapter), adapter, metadata=meta)
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_model("llama"), adapter, backend="reference")


def test_stepping_a_deleted_model_raises():
    model, opt = _trained()
    del model
    gc.collect()
    with pytest.raises(ValueError, match="belongs to a KeystoneLinear that was freed"):
        opt.step()


def test_optimizer_state_of_another_mask_is_refused_at_load():
    _, opt = _trained(mask=MASK)
    other = KeystoneMask({("attn_q", 0, None): [1, 2, 7], ("fwd_up", 1, None): [0, 70], ("attn_o", 1, None): [3]})
    model2, opt2 = _trained(mask=other)
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=r"does not fit: tensor 0 has shape \(3, 48\) here, \(2, 48\) in the saved"):
        opt2.load_state_dict(opt.state_dict())
    after = opt2.state_dict()
    for k, v in before["state"].items():
        assert all(torch.equal(v[n], after["state"][k][n]) for n in v)


def _same_state(before: dict, opt) -> bool:
    after = opt.state_dict()["state"]
    return all(torch.equal(v[n], after[k][n]) for k, v in before["state"].items() for n in v)


def test_optimizer_state_of_another_mask_of_the_same_shapes_is_refused_at_load():
    """Rows 2, 6, 18 instead of 1, 5, 17: every shape agrees, the moments would drive other rows."""
    mask_a = KeystoneMask({("attn_q", 0, None): [1, 5, 17], ("attn_o", 1, None): [3]})
    mask_b = KeystoneMask({("attn_q", 0, None): [2, 6, 18], ("attn_o", 1, None): [3]})
    _, opt_a = _trained(mask=mask_a)
    _, opt_b = _trained(mask=mask_b)
    before = copy.deepcopy(opt_b.state_dict())
    with pytest.raises(ValueError, match=r"tensor 0 \(weight_rows of shape \(3, 48\)\) has keystone rows "
                                         r"\[2, 6, 18\] here, \[1, 5, 17\] in the saved state"):
        opt_b.load_state_dict(opt_a.state_dict())
    assert _same_state(before, opt_b)


def _corrupt(state_dict: dict, how: str) -> dict:
    sd = copy.deepcopy(state_dict)
    entry = sd["state"][0]
    if how == "exp_avg a string":
        entry["exp_avg"] = "oops"
    elif how == "step missing":
        del entry["step"]
    elif how == "step NaN":
        entry["step"] = torch.tensor(float("nan"))
    elif how == "exp_avg_sq negative":
        entry["exp_avg_sq"] = entry["exp_avg_sq"] - 1.0
    elif how == "exp_avg_sq NaN":
        entry["exp_avg_sq"][0, 0] = float("nan")
    elif how == "exp_avg Inf":
        entry["exp_avg"][0, 0] = float("inf")
    elif how == "lr NaN":
        sd["param_groups"][0]["lr"] = float("nan")
    elif how == "a list":
        return [sd]
    elif how == "layout damaged":
        sd["keystone_layout"] = sd["keystone_layout"][:1]
    return sd


@pytest.mark.parametrize("how,message", [
    ("exp_avg a string", "tensor 0 .*: field 'exp_avg' is str, not a float tensor"),
    ("step missing", "tensor 0 .*: the saved state lacks 'step'"),
    ("step NaN", "tensor 0 .*: field 'step' is tensor\\(nan\\); it must be a whole number >= 0"),
    ("exp_avg_sq negative", "tensor 0 .*: field 'exp_avg_sq' holds negative values"),
    ("exp_avg_sq NaN", "tensor 0 .*: field 'exp_avg_sq' holds NaN or Inf"),
    ("exp_avg Inf", "tensor 0 .*: field 'exp_avg' holds NaN or Inf"),
    ("lr NaN", "param group 0 has an invalid lr \\(nan\\)"),
    ("a list", "not an optimizer state dict"),
    ("layout damaged", "'keystone_layout' field is not a list of 3 tensor descriptions"),
])
def test_an_optimizer_state_that_cannot_be_trusted_is_refused_at_load(how, message):
    model, opt = _trained(steps=2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_corrupt(opt.state_dict(), how))
    assert _same_state(before, opt)
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # the optimizer still works, untouched
    assert all(bool(torch.isfinite(p).all()) for p in keystone_parameters(model))


def test_an_optimizer_state_saved_before_layouts_were_recorded_still_loads():
    _, opt = _trained(steps=2)
    legacy = {k: v for k, v in opt.state_dict().items() if k != "keystone_layout"}
    _, fresh = _trained(steps=1)
    fresh.load_state_dict(legacy)
    assert int(fresh.state_dict()["state"][0]["step"]) == 2


def test_an_edited_digit_of_the_adapter_mask_is_refused(adapter):
    """q_proj rows [1, 7] -> [1, 6]: valid JSON and valid shapes, so only the checksum can tell."""
    meta = _metadata(adapter)
    assert '"0": [1, 7]' in meta["mask"]
    meta["mask"] = meta["mask"].replace('"0": [1, 7]', '"0": [1, 6]')
    save_file(load_file(adapter), adapter, metadata=meta)
    with pytest.raises(ValueError, match="metadata .* do not match the adapter's checksum"):
        load_adapter(tiny_model("llama"), adapter, backend="reference")


@pytest.mark.parametrize("field,value", [("base_fingerprint", "0123456789abcdef"), ("frozen_dtype", "torch.float16"),
                                         ("train_bias", "True"), ("base_model", "another")])
def test_every_metadata_field_is_covered_by_the_checksum(adapter, field, value):
    meta = _metadata(adapter)
    assert meta[field] != value
    meta[field] = value
    save_file(load_file(adapter), adapter, metadata=meta)
    with pytest.raises(ValueError, match="do not match the adapter's checksum"):
        load_adapter(tiny_model("llama"), adapter, backend="reference")


@pytest.mark.parametrize("fmt", ["keystone-adapter/1", "keystone-adapter/2"])
def test_an_edited_adapter_relabelled_to_an_older_format_is_refused(adapter, fmt):
    """Editing the mask and the format field together must not skip the check: /1 carried no checksum, and /2's
    covers the tensors alone, which a /3 checksum is not."""
    meta = _metadata(adapter)
    meta["mask"] = meta["mask"].replace("1", "2", 1)
    meta["format"] = fmt
    save_file(load_file(adapter), adapter, metadata=meta)
    with pytest.raises(ValueError, match="format field was edited" if fmt.endswith("/1") else "checksum"):
        load_adapter(tiny_model("llama"), adapter, backend="reference")


def test_a_version_1_adapter_without_a_checksum_loads_with_a_warning(adapter):
    tensors = load_file(adapter)
    meta = _metadata(adapter)
    meta["format"] = "keystone-adapter/1"
    del meta["checksum"]
    save_file(tensors, adapter, metadata=meta)
    with pytest.warns(UserWarning, match="before adapters carried checksums"):
        model = load_adapter(tiny_model("llama"), adapter, backend="reference")
    assert all(torch.equal(p.detach(), tensors[n]) for n, p in model.named_parameters() if n in tensors)


def test_a_version_2_adapter_loads_with_a_warning(adapter):
    from keystone_kernels.serialization.adapter import tensors_checksum

    tensors = load_file(adapter)
    meta = _metadata(adapter)
    meta["format"], meta["checksum"] = "keystone-adapter/2", tensors_checksum(tensors)
    save_file(tensors, adapter, metadata=meta)
    with pytest.warns(UserWarning, match="covers its tensors but not its mask"):
        model = load_adapter(tiny_model("llama"), adapter, backend="reference")
    assert all(torch.equal(p.detach(), tensors[n]) for n, p in model.named_parameters() if n in tensors)


def test_a_patched_model_pickles_and_trains_after_unpickling(tmp_path):
    model, _ = _trained()
    clone = pickle.loads(pickle.dumps(model))
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for m in (clone, loaded):
        opt = KeystoneAdamW(keystone_parameters(m), lr=1e-2, backend="reference")
        ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(3))
        m(input_ids=ids, labels=ids).loss.backward()
        before = {n: b.clone() for n, b in m.named_buffers() if n.endswith("frozen_weight")}
        opt.step()
        changed = [n for n, b in m.named_buffers() if n.endswith("frozen_weight") and not torch.equal(b, before[n])]
        assert changed, "the unpickled model's keystone tensors did not reach its frozen weights"


def test_jsonl_errors_name_the_line_and_the_field(tmp_path):
    from keystone_kernels.sft_data import _check_row, read_rows

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    assert [r["prompt"] for r in read_rows(good)] == ["a", "c"]  # a blank line is skipped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    with pytest.raises(ValueError, match=r"row 3: field 'response' is int \(5\), not a string"):
        _check_row(3, {"prompt": "x", "response": 5})
    with pytest.raises(ValueError, match=r"row 4: missing field\(s\) \['response'\]"):
        _check_row(4, {"prompt": "x"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_a_clear_error(capsys):
    from keystone_kernels.cli import main

    assert main(["find", "--device", "cuda", "--model", "default"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and "Traceback" not in err


def test_merge_reproduces_the_patched_model_exactly():
    """The merged model computes with the bf16-rounded values the patched model trained through."""
    from keystone_kernels import merge

    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    model, _ = _trained(frozen_dtype=torch.bfloat16, steps=3, lr=3e-2, ids=ids)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
        masters = merge(copy.deepcopy(model), dtype=torch.float32, masters=True)(input_ids=ids).logits
        merged = merge(model, dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(merged, patched)
    assert not torch.equal(masters, patched)  # the fp32 masters differ from what was trained through


@pytest.mark.parametrize("frozen_dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_of_a_patched_model_loads_as_the_trained_model(tmp_path, frozen_dtype):
    """model.save_pretrained / Trainer.save_model write the merged model (+ adapter); from_pretrained loads it."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from keystone_kernels.serialization.adapter import ADAPTER_NAME

    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(6))
    model, _ = _trained(frozen_dtype=frozen_dtype, steps=2, lr=3e-2, ids=ids)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "direct")
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True)
    Trainer(model=model, args=args).save_model(str(tmp_path / "trainer"))
    for folder in ("direct", "trainer"):
        assert (tmp_path / folder / ADAPTER_NAME).is_file()
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        with torch.no_grad():
            assert torch.equal(plain(input_ids=ids).logits, want), folder
    clone = copy.deepcopy(model)  # still copies and pickles with the merged save installed
    pickle.loads(pickle.dumps(clone))


def test_mask_file_errors_name_the_file_and_the_entry(tmp_path):
    bad = tmp_path / "mask.json"
    bad.write_text('{"attn_q": {"0": 5}}')
    with pytest.raises(ValueError, match=r"mask.json: mask entry 'attn_q' layer '0' must be a list .* \[5\]"):
        KeystoneMask.from_json(bad)
    bad.write_text('{"attn_q": ')
    with pytest.raises(ValueError, match=r"mask.json: not valid JSON"):
        KeystoneMask.from_json(bad)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompts_longer_than_the_context_are_cut_with_a_warning(family):
    """It ran past the context (Llama) or raised IndexError (GPT-2); now it records the first
    ``context`` tokens and says so."""
    from tiny import tiny_tokenizer

    from keystone_kernels import find_keystone
    from keystone_kernels.analysis.discovery import context_length

    model, tok = tiny_model(family), tiny_tokenizer()
    limit = context_length(model)
    long = " ".join(["word"] * (3 * limit))
    with pytest.warns(UserWarning, match=rf"longer than {limit} tokens \(the model's context of {limit};"
                                         rf".* first {limit} tokens"):
        cut = find_keystone(model, tok, prompts={"a": [long], "b": ["short one"]}, progress=False)
    # the same as asking for the cut explicitly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asked = find_keystone(model, tok, prompts={"a": [long], "b": ["short one"]}, max_length=limit, progress=False)
    assert all(m.num_neurons > 0 for m in cut.group_masks.values())
    assert cut.group_masks["a"] == asked.group_masks["a"]


def test_prompts_file_that_does_not_parse_names_the_file(tmp_path, capsys):
    from keystone_kernels.cli import main

    bad = tmp_path / "prompts.json"
    bad.write_text('{"math": ["1 + 1 ="')
    assert main(["find", "--model", "default", "--device", "cpu", "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "prompts.json: not valid JSON" in err and "Traceback" not in err


def test_a_new_run_removes_the_temporaries_of_a_killed_one(tmp_path):
    from tiny import tiny_tokenizer

    from keystone_kernels.sft import SFTConfig, train
    from keystone_kernels.sft_data import SFTDataset

    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-00000002-deadbeef-x").mkdir(parents=True)
    (out / ".tmp-abc-keystone_adapter.safetensors").write_bytes(b"half")
    tok = tiny_tokenizer()
    rows = [{"prompt": f"{a} plus {a}?", "response": f"{2 * a}"} for a in range(2, 8)]
    train(tiny_model("llama"), tok, MASK, SFTDataset(rows, tok), SFTConfig(steps=1, batch_size=2, backend="reference"),
          out, progress=False)
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))

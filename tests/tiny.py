"""Tiny random models of every supported family and a byte-level tokenizer: no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

VOCAB = 259 + 5  # byte-level tokenizer: 3 specials + 256 bytes

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),
    # explicit head_dim different from hidden // heads (12): the reference's formula would be wrong
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**_COMMON, head_dim=12),
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=16),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=16),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                  eos_token_id=2),
    "mixtral": lambda: tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**{**_COMMON, "intermediate_size": 64}, head_dim=16, num_experts=4,
                                            num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[1]),
}


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    # random init leaves some weights at exact zero / one (norms); perturb everything so no test runs on zeros
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_tokenizer():
    """A real fast tokenizer (byte-level, no merges: one token per byte), BOS prepended, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(byte_chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    return fast


PROMPTS = {
    "a": ["the cat sat on the mat", "one two three", "x = 4 + 5", "hello world again"],
    "b": ["def f(x): return x", "SELECT * FROM t;", "for i in range(3):"],
    "c": ["bonjour le monde", "hola"],
}


def write_sft_files(folder: Path) -> Path:
    """``folder/train.jsonl`` (18 one-digit additions with prompt / response / answer) and
    ``folder/eval.jsonl`` (its first 4): a tiny fine-tuning set for the CLI tests. Returns ``folder``."""
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)}
            for a in range(3, 9) for b in range(2, 5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return folder

"""Model shapes (real configs, random weights) and synthetic keystone masks for the benchmarks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .. import arch
from ..mask import KeystoneMask

FRACTIONS = (1e-4, 1e-3, 1e-2, 5e-2)


@dataclass(frozen=True)
class Shape:
    """The sizes of a real model (weights are random; only the shapes matter for speed and memory)."""

    name: str
    family: str  # "llama" or "qwen3"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    head_dim: int | None = None  # None: hidden // heads (Llama); Qwen3 sets its own

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def projections(self) -> list[tuple[str, int, int]]:
        """``(name, out, in)`` of the seven projections of one decoder layer, ``nn.Linear`` terms."""
        q, kv, h, i = self.heads * self.dim_head, self.kv_heads * self.dim_head, self.hidden, self.intermediate
        return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    @property
    def projection_params_per_layer(self) -> int:
        return sum(o * i for _, o, i in self.projections())

    @property
    def projection_params(self) -> int:
        return self.layers * self.projection_params_per_layer

    @property
    def total_params(self) -> int:
        """Every parameter of the model: projections, embeddings (and an untied lm_head), RMSNorms."""
        norms = self.layers * 2 * self.hidden + self.hidden
        if self.family == "qwen3":
            norms += self.layers * 2 * self.dim_head  # q_norm / k_norm
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.projection_params + embed + norms

    def config(self, layers: int | None = None):
        """A Transformers config of this shape (``layers`` overrides the number of decoder layers)."""
        kw = dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=layers or self.layers,
                  num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                  tie_word_embeddings=self.tie_embeddings, max_position_embeddings=4096, use_cache=False)
        if self.family == "qwen3":
            from transformers import Qwen3Config

            return Qwen3Config(head_dim=self.dim_head, **kw)
        from transformers import LlamaConfig

        return LlamaConfig(head_dim=self.dim_head, **kw)


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, True),
    Shape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, True),
    Shape("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, False),
    Shape("qwen3-0.6b", "qwen3", 1024, 3072, 28, 16, 8, 151936, True, head_dim=128),
)}


def build_model(shape: Shape, layers: int | None = None, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32, seed: int = 0):
    """A causal LM of ``shape`` with random weights (``device="meta"``: shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(layers), dtype=dtype)
    return model


def synthetic_mask(model, fraction: float, seed: int = 0, layers: Iterable[int] | None = None):
    """A random mask holding ``fraction`` of the neurons of the paper's six types.

    ``n = max(1, round(fraction * total))`` neurons are drawn uniformly from the union of every
    (type, layer) index space (of ``layers`` only, when given), so each space holds ``fraction``
    of its neurons in expectation, also where ``fraction * size < 1``.
    """
    keys = arch.neuron_keys(model, arch.family_for(model), None)
    if layers is not None:
        wanted = set(layers)
        keys = {k: s for k, s in keys.items() if k[1] in wanted}
    names = list(keys)
    sizes = torch.tensor([keys[k].size for k in names], dtype=torch.int64)
    total = int(sizes.sum())
    n = min(total, max(1, round(fraction * total)))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=gen)[:n]
    starts = torch.cumsum(sizes, 0) - sizes
    which = torch.searchsorted(starts, picks, right=True) - 1
    local = picks - starts[which]
    neurons = {names[i]: local[which == i] for i in torch.unique(which).tolist()}
    return KeystoneMask(neurons, {"synthetic": True, "fraction": fraction, "seed": seed, "total_neurons": total})


def layer_mask(model, fraction: float, layer: int = 0, seed: int = 0):
    """``max(1, round(fraction * size))`` random neurons of every type in one layer (weight-grad bench)."""
    gen = torch.Generator().manual_seed(seed)
    keys = {k: s for k, s in arch.neuron_keys(model, arch.family_for(model), None).items() if k[1] == layer}
    return KeystoneMask({k: torch.randperm(s.size, generator=gen)[: max(1, round(fraction * s.size))]
                         for k, s in keys.items()},
                        {"synthetic": True, "fraction": fraction, "seed": seed, "layer": layer})


def projection_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"

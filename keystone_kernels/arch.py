"""Where each projection lives, one small table per model family.

A *neuron type* (the paper's definitions, docs/design.md section 1) names an activation channel and the
weights that channel owns:

==========  ==========================================  ==========================
type        activation measured                         weights it owns
==========  ==========================================  ==========================
attn_q  j   query after RoPE, channel j                  row j of q_proj
attn_k  j   key after RoPE + repeat_kv (query space)     row kv(j) of k_proj
attn_v  j   value after repeat_kv (query space)          row kv(j) of v_proj
attn_o  j   input of o_proj, channel j                   column j of o_proj
fwd_up  j   output of up_proj, channel j                 row j of up_proj
fwd_down j  input of down_proj, channel j                column j of down_proj
res_attn j  output of o_proj, channel j (residual)       row j of o_proj
res_mlp  j  output of down_proj, channel j (residual)    row j of down_proj
==========  ==========================================  ==========================

Weights are always addressed in ``nn.Linear`` terms, ``W: [out, in]``. GPT-2's ``Conv1D`` stores the
transpose and its q/k/v share one fused ``c_attn``; MoE experts (Transformers 5) are 3-D tensors
``gate_up_proj: [E, 2 I, H]`` and ``down_proj: [E, H, I]``. :class:`WeightSlot` hides all three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

PAPER_TYPES = ("attn_q", "attn_k", "attn_v", "attn_o", "fwd_up", "fwd_down")
RESIDUAL_TYPES = ("res_attn", "res_mlp")
ALL_TYPES = PAPER_TYPES + RESIDUAL_TYPES
TYPE_ALIASES = {"paper": PAPER_TYPES, "residual": RESIDUAL_TYPES, "all": ALL_TYPES}


@dataclass(frozen=True)
class Family:
    """Module names of one model family, relative to a decoder layer (``layers`` is absolute).

    ``fused_qkv``: q, k, v are stacked on the output axis of one module (GPT-2 ``c_attn``).
    ``conv1d``: weights are stored ``[in, out]`` (GPT-2 ``Conv1D``).
    ``experts``: name of the 3-D experts module in MoE layers (``None``: dense FFN only).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    gate: str | None = "mlp.gate_proj"
    experts: str | None = None
    fused_qkv: bool = False
    conv1d: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("gemma", ("gemma", "gemma2", "gemma3_text")),
    Family("gemma3", ("gemma3",), layers="model.language_model.layers"),
    Family("mixtral", ("mixtral",), experts="mlp.experts"),
    Family("qwen3_moe", ("qwen3_moe",), experts="mlp.experts"),
    Family(
        "gpt2",
        ("gpt2",),
        layers="transformer.h",
        attention="attn",
        q="attn.c_attn",
        k="attn.c_attn",
        v="attn.c_attn",
        o="attn.c_proj",
        up="mlp.c_fc",
        down="mlp.c_proj",
        gate=None,
        fused_qkv=True,
        conv1d=True,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model: nn.Module, modules: dict | None = None) -> Family:
    """The :class:`Family` of ``model``; ``modules`` overrides or defines module names.

    ``modules`` takes the field names of :class:`Family` (``layers``, ``q``, ``k``, ``v``, ``o``,
    ``up``, ``down``, ...), so an unlisted architecture with standard projections works with
    ``modules={"layers": "backbone.blocks", "q": "attn.wq", ...}``.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = next((f for f in FAMILIES if model_type in f.model_types), None)
    if base is None and not modules:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}. "
            "For another architecture pass the module names explicitly, e.g. modules={'layers': 'model.layers', "
            "'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj', 'o': 'self_attn.o_proj', "
            "'up': 'mlp.up_proj', 'down': 'mlp.down_proj'}"
        )
    if modules:
        known = {f.name for f in dataclasses.fields(Family)}
        unknown = set(modules) - known
        if unknown:
            raise ValueError(f"unknown module keys {sorted(unknown)}; "
                             f"accepted: {sorted(known - {'name', 'model_types'})}")
        base = dataclasses.replace(base or Family("custom", (str(model_type),)), **modules)
    return base


@dataclass(frozen=True)
class Dims:
    """Sizes that define the neuron index spaces of a model's text stack."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_row(self, j: torch.Tensor) -> torch.Tensor:
        """Map query-head channel j to the k/v row it reads: docs/design.md section 1, kv(j)."""
        return ((j // self.head_dim) // self.kv_groups) * self.head_dim + j % self.head_dim


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def dims_of(model: nn.Module) -> Dims:
    cfg = text_config(model)
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    # Qwen3 / Gemma3 set head_dim explicitly and it differs from hidden // heads.
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return Dims(int(layers), int(hidden), int(heads), int(kv_heads), int(head_dim))


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"module {path!r} not found in {type(model).__name__}: {err}") from None


def layers_of(model: nn.Module, family: Family) -> nn.ModuleList:
    return get_submodule(model, family.layers)


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class WeightSlot:
    """Where a neuron type's weights live in one layer (and expert).

    ``key`` names a 2-D weight in ``[out, in]`` terms: a module path (``nn.Linear`` / ``Conv1D``) or,
    for an expert, ``"<experts path>.<param>.<e>"``. Neuron j owns row (``axis="row"``) or column
    ``offset + map(j)`` of it, where map is :meth:`Dims.kv_row` when ``kv`` is set, else identity.
    """

    key: str
    axis: str
    offset: int = 0
    kv: bool = False
    size: int = 0  # size of the neuron index space of this type


def _experts_module(model: nn.Module, family: Family, layer: int) -> nn.Module | None:
    if family.experts is None:
        return None
    layer_mod = layers_of(model, family)[layer]
    try:
        return layer_mod.get_submodule(family.experts)
    except AttributeError:
        return None  # a dense layer inside an MoE model (Qwen3-MoE mlp_only_layers)


def weight_slot(model: nn.Module, family: Family, ntype: str, layer: int, expert: int | None = None) -> WeightSlot:
    """The :class:`WeightSlot` of neuron type ``ntype`` in ``layer`` (and ``expert``)."""
    if ntype not in ALL_TYPES:
        raise ValueError(f"unknown neuron type {ntype!r}; accepted: {', '.join(ALL_TYPES)}")
    dims = dims_of(model)
    if not 0 <= layer < dims.num_layers:
        raise ValueError(f"layer {layer} out of range for a model with {dims.num_layers} layers")
    prefix = f"{family.layers}.{layer}."
    q_space = dims.num_heads * dims.head_dim
    if ntype in ("fwd_up", "fwd_down", "res_mlp"):
        experts = _experts_module(model, family, layer)
        if expert is not None:
            if experts is None:
                raise ValueError(f"{ntype} layer {layer} expert {expert}: layer {layer} has no experts module")
            num = experts.gate_up_proj.shape[0]
            if not 0 <= expert < num:
                raise ValueError(f"{ntype} layer {layer}: expert {expert} out of range (layer has {num} experts)")
            inter = experts.down_proj.shape[-1]
            base = f"{prefix}{family.experts}"
            if ntype == "fwd_up":  # gate_up_proj rows are [gate; up]: up starts at I
                return WeightSlot(f"{base}.gate_up_proj.{expert}", "row", offset=inter, size=inter)
            if ntype == "fwd_down":
                return WeightSlot(f"{base}.down_proj.{expert}", "col", size=inter)
            return WeightSlot(f"{base}.down_proj.{expert}", "row", size=dims.hidden)
        if experts is not None:
            raise ValueError(f"{ntype} layer {layer} is an MoE layer: give an expert index "
                             f"(JSON key '{layer}_expert_E')")
        up = get_submodule(model, prefix + family.up)
        inter = _out_features(up)
        if ntype == "fwd_up":
            return WeightSlot(prefix + family.up, "row", size=inter)
        if ntype == "fwd_down":
            return WeightSlot(prefix + family.down, "col", size=inter)
        return WeightSlot(prefix + family.down, "row", size=dims.hidden)
    if expert is not None:
        raise ValueError(f"{ntype} layer {layer}: attention neurons have no expert index (got {expert})")
    if ntype == "attn_q":
        return WeightSlot(prefix + family.q, "row", size=q_space)
    if ntype in ("attn_k", "attn_v"):
        name = family.k if ntype == "attn_k" else family.v
        offset = 0
        if family.fused_qkv:  # c_attn output is [q | k | v], each of width hidden
            offset = q_space if ntype == "attn_k" else q_space + dims.num_kv_heads * dims.head_dim
        return WeightSlot(prefix + name, "row", offset=offset, kv=dims.kv_groups > 1, size=q_space)
    if ntype == "attn_o":
        return WeightSlot(prefix + family.o, "col", size=q_space)
    return WeightSlot(prefix + family.o, "row", size=dims.hidden)  # res_attn


def _out_features(module: nn.Module) -> int:
    w = module.weight
    return w.shape[1] if is_conv1d(module) else w.shape[0]


def weight_2d(model: nn.Module, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight named by a :class:`WeightSlot` key as an ``[out, in]`` view, and its bias (or None).

    The view shares storage with the model, so in-place edits change the model.
    """
    try:
        module = model.get_submodule(key)
    except AttributeError:
        module = None
    if module is not None:
        if is_conv1d(module):
            return module.weight.t(), module.bias
        if isinstance(module, nn.Linear) or hasattr(module, "weight"):
            return module.weight, getattr(module, "bias", None)
    # "<experts path>.<param>.<expert>"
    path, _, expert = key.rpartition(".")
    owner_path, _, param = path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
        tensor = getattr(owner, param)
        return tensor[int(expert)], None
    except (AttributeError, ValueError, IndexError):
        raise ValueError(f"weight {key!r} not found in {type(model).__name__}") from None


def resolve_types(types) -> tuple[str, ...]:
    """``None`` -> the paper's six types; aliases ``"paper"``, ``"residual"``, ``"all"``; or a list of names."""
    if types is None:
        return PAPER_TYPES
    if isinstance(types, str):
        types = [types]
    out: list[str] = []
    for t in types:
        for name in TYPE_ALIASES.get(t, (t,)):
            if name not in ALL_TYPES:
                raise ValueError(f"unknown neuron type {name!r}; "
                                 f"accepted: {', '.join(ALL_TYPES)} or {', '.join(TYPE_ALIASES)}")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("types is empty")
    return tuple(out)


def neuron_keys(model: nn.Module, family: Family, types) -> dict[tuple, WeightSlot]:
    """Every (type, layer, expert) of ``types`` in ``model``, with its :class:`WeightSlot`."""
    out = {}
    for layer in range(dims_of(model).num_layers):
        experts = _experts_module(model, family, layer)
        for ntype in resolve_types(types):
            if experts is not None and ntype in ("fwd_up", "fwd_down", "res_mlp"):
                for e in range(experts.gate_up_proj.shape[0]):
                    out[(ntype, layer, e)] = weight_slot(model, family, ntype, layer, e)
            else:
                out[(ntype, layer, None)] = weight_slot(model, family, ntype, layer)
    return out

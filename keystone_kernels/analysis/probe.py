"""Activation probes: record mean |activation| per neuron while the model runs unchanged.

Forward hooks cover the activations that are module inputs or outputs (``attn_o``, ``fwd_up``,
``fwd_down``, ``res_*``). Two values are not: q and k after RoPE, v after repeat_kv live inside the
attention function, and per-expert activations inside the experts function of MoE layers. For
those, the probe registers a wrapper with Transformers' ``AttentionInterface`` /
``ExpertsInterface`` under a private name and points the config at it only while probing; the
wrapper records, then calls the original function with the original arguments.

The attention mask follows the implementation name: ``create_causal_mask`` returns no mask at all
for a name it does not know, and eager (or flex) attention without a mask attends both ways. So
the probe also registers, under the same private name, the mask function of the original
implementation (``AttentionMaskInterface``): the model builds exactly the mask it builds without
the probe, and outputs are unchanged (tested for eager, sdpa and flex on every family).

Sums are kept per recorded sequence (``rows``), so one pass gives both each prompt's mean and the
token-weighted mean of a group.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import arch
from ..mask import NeuronKey

PROBE_PREFIX = "keystone_probe"


class Recorder:
    """Sums of |activation| per (neuron key, recorded sequence).

    ``sums[key]``: float64 ``[rows, N]``; ``counts[key]``: float64 ``[rows]`` (weighted positions, or
    tokens routed to an expert). Before each forward the caller sets ``weights`` (``[B, S]`` float, 1 at
    counted positions, 0 elsewhere, padding included) and ``batch_rows`` (``[B]`` int64: which
    sequence each batch row is).
    """

    def __init__(self, wanted: set[NeuronKey], rows: int):
        self.wanted, self.rows = wanted, rows
        self.sums: dict[NeuronKey, torch.Tensor] = {}
        self.counts: dict[NeuronKey, torch.Tensor] = {}
        self.weights: torch.Tensor | None = None
        self.batch_rows: torch.Tensor | None = None

    def add(self, key: NeuronKey, act: torch.Tensor, weights: torch.Tensor | None = None,
            rows: torch.Tensor | None = None) -> None:
        """``act``: ``[B, S, N]`` (weights and rows of the batch) or ``[n, N]`` with ``weights [n]``, ``rows [n]``."""
        if key not in self.wanted:
            return
        if weights is None:
            weights, rows = self.weights, self.batch_rows
        w = weights.to(act.device, torch.float32)
        rows = rows.to(act.device)
        if act.dim() == 3:  # [B, S, N]: reduce positions first, one row per batch row
            total = torch.einsum("bsn,bs->bn", act.detach().abs().float(), w)
            count = w.sum(1)
        else:  # [n, N] tokens, each with its own row
            total = act.detach().abs().float() * w[:, None]
            count = w
        if key not in self.sums:
            self.sums[key] = torch.zeros(self.rows, act.shape[-1], dtype=torch.float64, device=act.device)
            self.counts[key] = torch.zeros(self.rows, dtype=torch.float64, device=act.device)
        self.sums[key].index_add_(0, rows, total.double())
        self.counts[key].index_add_(0, rows, count.double())


_ACTIVE: list[Probe] = []


def _flat_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D] (channel j = h * D + d)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    probe = _ACTIVE[-1]
    layer = probe.attn_layer[id(module)]
    groups = query.shape[1] // key.shape[1]
    rec = probe.recorder
    rec.add(("attn_q", layer, None), _flat_heads(query))
    rec.add(("attn_k", layer, None), _flat_heads(key.repeat_interleave(groups, dim=1)))
    rec.add(("attn_v", layer, None), _flat_heads(value.repeat_interleave(groups, dim=1)))
    original = probe.original_attention(module)
    return original(module, query, key, value, attention_mask, **kwargs)


def _probe_experts(module, hidden_states, top_k_index, top_k_weights):
    """Record per-expert up / down-input / down-output activations, then run the original experts."""
    probe = _ACTIVE[-1]
    layer = probe.expert_layer[id(module)]
    rec = probe.recorder
    flat_w = rec.weights.reshape(-1)
    flat_rows = rec.batch_rows[:, None].expand(rec.weights.shape).reshape(-1)
    inter = module.down_proj.shape[-1]
    with torch.no_grad():
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < module.gate_up_proj.shape[0]:
                continue
            tokens = (top_k_index == e).any(dim=-1).nonzero().flatten()
            x = hidden_states[tokens]
            gate_up = nn.functional.linear(x, module.gate_up_proj[e])
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
            mid = module.act_fn(gate) * up
            w, rows = flat_w[tokens.to(flat_w.device)], flat_rows[tokens.to(flat_rows.device)]
            rec.add(("fwd_up", layer, e), up, w, rows)
            rec.add(("fwd_down", layer, e), mid, w, rows)
            rec.add(("res_mlp", layer, e), nn.functional.linear(mid, module.down_proj[e]), w, rows)
    return probe.original_experts(module)(module, hidden_states, top_k_index, top_k_weights)


def probe_name(original: str) -> str:
    """The private implementation name that routes through the probe for ``original``."""
    return f"{PROBE_PREFIX}_{original}"


def _register_attention(original: str) -> str:
    """Register the probe wrapper and ``original``'s mask function under :func:`probe_name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    name = probe_name(original)
    AttentionInterface.register(name, _probe_attention)
    # Without this, masking_utils builds no mask for the unknown name and eager attention runs
    # bidirectionally. An original name without a mask function gets none, as without the probe.
    if original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def _register_experts(original: str) -> str:
    from transformers.integrations.moe import ExpertsInterface

    name = probe_name(original)
    ExpertsInterface.register(name, _probe_experts)
    return name


class Probe:
    """Context manager installing every hook and wrapper for ``keys``; removes them all on exit.

    ``rows``: number of sequences the recorder keeps apart (see :class:`Recorder`).
    """

    def __init__(self, model: nn.Module, family: arch.Family, keys: dict[NeuronKey, arch.WeightSlot], rows: int = 1):
        self.model, self.family, self.keys = model, family, keys
        self.recorder = Recorder(set(keys), rows)
        self.handles: list = []
        self.attn_layer: dict[int, int] = {}
        self.expert_layer: dict[int, int] = {}
        self.saved_impl: dict[tuple[int, str], tuple[object, str, object]] = {}

    def original_attention(self, module):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = sys.modules[type(module).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(module._keystone_attn_impl, eager)

    def original_experts(self, module):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        return ALL_EXPERTS_FUNCTIONS.get_interface(module._keystone_experts_impl, type(module).forward.__wrapped__)

    def _use_probe_impl(self, cfg, attr: str, module: nn.Module, mark: str, register) -> None:
        """Point ``cfg``'s implementation name at the probe; remember the original on ``module``."""
        slot = (id(cfg), attr)
        if slot not in self.saved_impl:
            original = getattr(cfg, attr)
            self.saved_impl[slot] = (cfg, attr, original)
            # The private attribute, not the property: the property recurses into sub-configs.
            object.__setattr__(cfg, attr, register(original or "eager"))
        module.__dict__[mark] = self.saved_impl[slot][2] or "eager"

    def __enter__(self):
        fam, model = self.family, self.model
        types = {k[0] for k in self.keys}
        try:
            for i, layer in enumerate(arch.layers_of(model, fam)):
                self._hook_layer(i, layer, types)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        _ACTIVE.append(self)
        return self

    def _hook_layer(self, i: int, layer: nn.Module, types: set[str]) -> None:
        fam, rec = self.family, self.recorder

        def hook(ntype, pre: bool):
            def fn(mod, args, output=None):
                rec.add((ntype, i, None), args[0] if pre else output)
            return fn

        if types & {"attn_q", "attn_k", "attn_v"}:
            attn = layer.get_submodule(fam.attention)
            self.attn_layer[id(attn)] = i
            self._use_probe_impl(attn.config, "_attn_implementation_internal", attn, "_keystone_attn_impl",
                                 _register_attention)
        o = layer.get_submodule(fam.o)
        if "attn_o" in types:
            self.handles.append(o.register_forward_pre_hook(hook("attn_o", True)))
        if "res_attn" in types:
            self.handles.append(o.register_forward_hook(hook("res_attn", False)))
        experts = arch._experts_module(self.model, fam, i)
        if experts is not None:
            if types & {"fwd_up", "fwd_down", "res_mlp"}:
                self.expert_layer[id(experts)] = i
                self._use_probe_impl(experts.config, "_experts_implementation_internal", experts,
                                     "_keystone_experts_impl", _register_experts)
            return
        if "fwd_up" in types:
            self.handles.append(layer.get_submodule(fam.up).register_forward_hook(hook("fwd_up", False)))
        down = layer.get_submodule(fam.down)
        if "fwd_down" in types:
            self.handles.append(down.register_forward_pre_hook(hook("fwd_down", True)))
        if "res_mlp" in types:
            self.handles.append(down.register_forward_hook(hook("res_mlp", False)))

    def __exit__(self, *exc):
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for h in self.handles:
            h.remove()
        for cfg, attr, value in self.saved_impl.values():
            object.__setattr__(cfg, attr, value)
        for mod in self.model.modules():
            mod.__dict__.pop("_keystone_attn_impl", None)
            mod.__dict__.pop("_keystone_experts_impl", None)
        return False

"""Finding keystone neurons: activation probes, top-fraction selection, intersection over groups.

For each prompt group, probes record the mean |activation| of every neuron (docs/design.md section 1,
the paper's definitions) over the selected token positions: the last real token of each prompt
(``positions="last"``, the reference) or every real token (``"all"``, token-weighted). Neurons are
ranked per layer, per type across layers, or globally; the keystone set is the intersection of
the per-group selections.

Probes are forward hooks on modules, plus two scoped wrappers where a value is not a module
output: the attention function (q and k after RoPE, v after repeat_kv) and, for MoE models, the
experts function (per-expert up / down activations). Both are registered under a private name with
Transformers' ``AttentionInterface`` / ``ExpertsInterface`` and switched on only while probing.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field
from importlib import resources

import torch
from torch import nn

from . import arch
from .mask import KeystoneMask, NeuronKey, _layer_key

SELECTIONS = ("per_layer", "global_per_type", "global")
POSITIONS = ("last", "all")
_PROBE_IMPL = "keystone_probe"


# ---------------------------------------------------------------------------------------- prompts
def default_prompts() -> dict[str, list[str]]:
    """The shipped prompt groups (math, code, knowledge, multilingual; 8+ prompts each)."""
    text = resources.files("keystone_kernels").joinpath("data/prompts.json").read_text(encoding="utf-8")
    return json.loads(text)


def _check_prompts(prompts) -> dict[str, list[str]]:
    if not isinstance(prompts, dict) or not prompts:
        raise ValueError("prompts must be a non-empty dict {group_name: [prompt, ...]}")
    for name, group in prompts.items():
        if isinstance(group, str) or not group or not all(isinstance(p, str) and p.strip() for p in group):
            raise ValueError(f"prompt group {name!r} must be a non-empty list of non-empty strings")
    return prompts


# ---------------------------------------------------------------------------------------- probe
class _Recorder:
    """Sums of |activation| per neuron key, weighted by the current batch's position weights."""

    def __init__(self, wanted: set[NeuronKey]):
        self.wanted = wanted
        self.sums: dict[NeuronKey, torch.Tensor] = {}
        self.counts: dict[NeuronKey, float] = {}
        self.weights: torch.Tensor | None = None  # [B, S] float: which positions count

    def add(self, key: NeuronKey, act: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """act: [B, S, N] (weights from the batch) or [n, N] with explicit weights [n]."""
        if key not in self.wanted:
            return
        w = self.weights if weights is None else weights
        total = torch.einsum("...n,...->n", act.detach().abs().float(), w.to(act.device, torch.float32))
        count = float(w.sum())
        if key in self.sums:
            self.sums[key] += total.double()
            self.counts[key] += count
        else:
            self.sums[key] = total.double()
            self.counts[key] = count

    def means(self, sizes: dict[NeuronKey, int]) -> dict[NeuronKey, torch.Tensor]:
        """Mean |activation| per key (zeros for keys never reached, e.g. an expert no token chose)."""
        out = {}
        for key, size in sizes.items():
            if key in self.sums and self.counts[key] > 0:
                out[key] = (self.sums[key] / self.counts[key]).float().cpu()
            else:
                out[key] = torch.zeros(size)
        return out


_ACTIVE: list["_Probe"] = []


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
    flat_w = probe.recorder.weights.reshape(-1)
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
            w = flat_w[tokens]
            probe.recorder.add(("fwd_up", layer, e), up, w)
            probe.recorder.add(("fwd_down", layer, e), mid, w)
            probe.recorder.add(("res_mlp", layer, e), nn.functional.linear(mid, module.down_proj[e]), w)
    return probe.original_experts(module)(module, hidden_states, top_k_index, top_k_weights)


def _register_probe_functions() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_PROBE_IMPL, _probe_attention)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # older Transformers: no experts interface, no 3-D experts either
        return
    ExpertsInterface.register(_PROBE_IMPL, _probe_experts)


class _Probe:
    """Context manager installing every hook and wrapper for ``keys``; removes them all on exit."""

    def __init__(self, model: nn.Module, family: arch.Family, keys: dict[NeuronKey, arch.WeightSlot]):
        self.model, self.family, self.keys = model, family, keys
        self.recorder = _Recorder(set(keys))
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

    def _use_probe_impl(self, cfg, attr: str, module: nn.Module, mark: str) -> None:
        """Point ``cfg``'s implementation name at the probe; remember the original on ``module``."""
        slot = (id(cfg), attr)
        if slot not in self.saved_impl:
            self.saved_impl[slot] = (cfg, attr, getattr(cfg, attr))
            # The private attribute, not the property: the property recurses into sub-configs.
            object.__setattr__(cfg, attr, _PROBE_IMPL)
        module.__dict__[mark] = self.saved_impl[slot][2] or "eager"

    def __enter__(self):
        _register_probe_functions()
        fam, model = self.family, self.model
        types = {k[0] for k in self.keys}
        layers = arch.layers_of(model, fam)
        for i, layer in enumerate(layers):
            def hook(ntype, pre: bool, i=i):
                def fn(mod, args, output=None):
                    act = args[0] if pre else output
                    self.recorder.add((ntype, i, None), act)
                return fn

            if types & {"attn_q", "attn_k", "attn_v"}:
                attn = layer.get_submodule(fam.attention)
                self.attn_layer[id(attn)] = i
                self._use_probe_impl(attn.config, "_attn_implementation_internal", attn, "_keystone_attn_impl")
            o = layer.get_submodule(fam.o)
            if "attn_o" in types:
                self.handles.append(o.register_forward_pre_hook(hook("attn_o", True)))
            if "res_attn" in types:
                self.handles.append(o.register_forward_hook(hook("res_attn", False)))
            experts = arch._experts_module(model, fam, i)
            if experts is not None:
                if types & {"fwd_up", "fwd_down", "res_mlp"}:
                    self.expert_layer[id(experts)] = i
                    self._use_probe_impl(experts.config, "_experts_implementation_internal", experts, "_keystone_experts_impl")
                continue
            if "fwd_up" in types:
                self.handles.append(layer.get_submodule(fam.up).register_forward_hook(hook("fwd_up", False)))
            down = layer.get_submodule(fam.down)
            if "fwd_down" in types:
                self.handles.append(down.register_forward_pre_hook(hook("fwd_down", True)))
            if "res_mlp" in types:
                self.handles.append(down.register_forward_hook(hook("res_mlp", False)))
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        for h in self.handles:
            h.remove()
        for cfg, attr, value in self.saved_impl.values():
            object.__setattr__(cfg, attr, value)
        for mod in self.model.modules():
            mod.__dict__.pop("_keystone_attn_impl", None)
            mod.__dict__.pop("_keystone_experts_impl", None)
        return False


# ---------------------------------------------------------------------------------------- batching
def _encode(tokenizer, prompts: list[str], chat: bool, max_length: int) -> list[list[int]]:
    out = []
    for p in prompts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("chat=True but the tokenizer has no chat template")
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        out.append(list(ids)[:max_length])
    return out


def _right_padded(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding keeps position ids of real tokens unchanged under a causal mask."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
    return ids.to(device), mask.to(device)


def position_weights(attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    """[B, S] float weights: 1 at the counted positions (last real token, or every real token)."""
    if positions == "all":
        return attention_mask.float()
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
    w = torch.zeros_like(attention_mask, dtype=torch.float32)
    w[torch.arange(len(w)), last] = 1.0
    return w


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    types=None,
    positions: str = "last",
    chat: bool = False,
    batch_size: int = 8,
    max_length: int = 512,
    modules: dict | None = None,
    progress=None,
) -> dict[NeuronKey, torch.Tensor]:
    """Mean |activation| per neuron over ``prompts``: ``{(type, layer, expert): fp32 [size]}`` on the CPU."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    family = arch.family_for(model, modules)
    keys = arch.neuron_keys(model, family, types)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = _encode(tokenizer, prompts, chat, max_length)
    was_training = model.training
    model.eval()
    try:
        with _Probe(model, family, keys) as probe:
            for start in range(0, len(encoded), batch_size):
                ids, mask = _right_padded(encoded[start : start + batch_size], pad_id, device)
                probe.recorder.weights = position_weights(mask, positions)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                if progress is not None:
                    progress.update(len(ids))
    finally:
        model.train(was_training)
    return probe.recorder.means({k: s.size for k, s in keys.items()})


# ---------------------------------------------------------------------------------------- selection
def _k_of(n: int, fraction: float) -> int:
    return max(1, int(n * fraction))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores; ties go to the lower index (stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def select_top(scores: dict[NeuronKey, torch.Tensor], fraction: float, selection: str = "per_layer") -> dict[NeuronKey, torch.Tensor]:
    """Pick the top ``fraction`` of neurons by score.

    ``per_layer``: ``max(1, int(n * fraction))`` per (type, layer, expert);
    ``global_per_type``: that many of all layers' neurons of each type, ranked together;
    ``global``: of all neurons of all types and layers, ranked together.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {fraction}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    keys = sorted(scores, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2]))
    if selection == "per_layer":
        return {k: torch.sort(_top(scores[k], _k_of(len(scores[k]), fraction))).values for k in keys}
    pools = [keys] if selection == "global" else [[k for k in keys if k[0] == t] for t in dict.fromkeys(k[0] for k in keys)]
    out: dict[NeuronKey, torch.Tensor] = {}
    for pool in pools:
        flat = torch.cat([scores[k].float() for k in pool])
        chosen = _top(flat, _k_of(len(flat), fraction))
        starts = list(itertools.accumulate([0] + [len(scores[k]) for k in pool]))
        for k, lo, hi in zip(pool, starts[:-1], starts[1:]):
            sel = chosen[(chosen >= lo) & (chosen < hi)] - lo
            out[k] = torch.sort(sel).values
    return out


# ---------------------------------------------------------------------------------------- find
@dataclass
class Discovery:
    """What :func:`find_keystone` found.

    ``mask``: the keystone neurons (intersection over groups); ``group_masks``: each group's own
    selection; ``pairwise_iou``: ``{"a & b": IoU}``; ``iou``: |intersection| / |union| over all
    groups; ``scores``: per-group mean |activation| ``{group: {key: fp32 [size]}}``;
    ``total_neurons``: size of the searched index space.
    """

    mask: KeystoneMask
    group_masks: dict[str, KeystoneMask]
    pairwise_iou: dict[str, float]
    iou: float
    scores: dict[str, dict[NeuronKey, torch.Tensor]] = field(repr=False)
    total_neurons: int = 0

    @property
    def fraction(self) -> float:
        return self.mask.num_neurons / max(1, self.total_neurons)


def find_keystone(
    model: nn.Module,
    tokenizer,
    prompts: dict[str, list[str]] | None = None,
    top_fraction: float = 0.01,
    selection: str = "per_layer",
    positions: str = "last",
    types=None,
    chat: bool = False,
    batch_size: int = 8,
    modules: dict | None = None,
    progress: bool = True,
) -> Discovery:
    """Find the keystone neurons of ``model`` with a few prompt groups.

    Args:
        prompts: ``{group_name: [prompt, ...]}``; None uses :func:`default_prompts`.
        top_fraction: fraction of neurons each group selects (``max(1, int(n * f))``).
        selection: ``"per_layer"`` (the reference), ``"global_per_type"`` or ``"global"``.
        positions: ``"last"`` (last real token of each prompt, the reference) or ``"all"``.
        types: neuron types (see :mod:`keystone_kernels.arch`); None = the paper's six;
            ``"residual"`` / ``"all"`` add residual-stream channels.
        chat: wrap each prompt in the tokenizer's chat template as a user turn.
        modules: module names for an architecture not in :data:`arch.FAMILIES`.

    Returns:
        :class:`Discovery`, whose ``mask`` is the intersection over groups.
    """
    from tqdm.auto import tqdm

    prompts = _check_prompts(default_prompts() if prompts is None else prompts)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    types = arch.resolve_types(types)
    bar = tqdm(total=sum(len(g) for g in prompts.values()), desc="Probing activations", unit="prompt", disable=not progress)
    scores = {}
    with bar:
        for name, group in prompts.items():
            bar.set_postfix(group=name)
            scores[name] = collect_activations(model, tokenizer, group, types, positions, chat, batch_size, modules=modules, progress=bar)
    sizes = {k: len(v) for k, v in next(iter(scores.values())).items()}
    meta_sizes = {f"{k[0]}/{_layer_key(k[1], k[2])}": n for k, n in sizes.items()}
    group_masks = {
        name: KeystoneMask(select_top(s, top_fraction, selection), {"sizes": meta_sizes}) for name, s in scores.items()
    }
    names = list(group_masks)
    keystone = group_masks[names[0]]
    union = group_masks[names[0]]
    for name in names[1:]:
        keystone = keystone & group_masks[name]
        union = union | group_masks[name]
    iou = keystone.num_neurons / max(1, union.num_neurons)
    pairwise = {f"{a} & {b}": group_masks[a].iou(group_masks[b]) for a, b in itertools.combinations(names, 2)}
    total = sum(sizes.values())
    keystone.metadata = {
        "model": getattr(model.config, "name_or_path", None) or type(model).__name__,
        "top_fraction": top_fraction,
        "selection": selection,
        "positions": positions,
        "types": list(types),
        "chat": chat,
        "groups": {n: len(g) for n, g in prompts.items()},
        "iou": iou,
        "pairwise_iou": pairwise,
        "total_neurons": total,
        "sizes": meta_sizes,
    }
    return Discovery(keystone, group_masks, pairwise, iou, scores, total)

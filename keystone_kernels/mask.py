"""KeystoneMask: neuron sets per (type, layer[, expert]) and the weight rows/columns they own.

JSON layout (the paper's reference code writes and reads it)::

    {"attn_q": {"0": [5, 17]}, "fwd_up": {"3": [...], "3_expert_1": [...]}, ...,
     "__metadata__": {...our additions: model, fraction, selection, positions, groups, iou, sizes}}

The paper's own loaders (its ``train.py``) choke on ``__metadata__`` and on a missing type, so
``to_json(path, paper_compatible=True)`` writes all six of its types and nothing else, with the
metadata in a sidecar file (:func:`sidecar_path`) that :meth:`KeystoneMask.from_json` reads back.

In weight terms a mask is, per 2-D weight ``W: [out, in]``, a sorted row set R and column set C.
Ownership rule: a row in R owns its whole row, a column in C owns its entries outside R, so every
weight element belongs to at most one trainable tensor and ``num_parameters`` counts each once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import arch
from .utils.io import atomic_write_text

NeuronKey = tuple[str, int, "int | None"]  # (type, layer, expert)
METADATA_KEY = "__metadata__"
RANDOM_MATCHES = ("weights", "neurons")


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where a paper-compatible mask keeps its metadata: ``mask.json`` -> ``mask.meta.json``."""
    p = Path(path)
    return p.with_name((p.stem if p.suffix == ".json" else p.name) + ".meta.json")


@dataclass(frozen=True)
class WeightIndices:
    """Rows R and columns C of one ``[out, in]`` weight; int64, sorted, unique, on the CPU."""

    rows: torch.Tensor
    cols: torch.Tensor

    def num_parameters(self, shape: tuple[int, int]) -> int:
        out, inp = shape
        return len(self.rows) * inp + (out - len(self.rows)) * len(self.cols)


def layer_key(layer: int, expert: int | None) -> str:
    return str(layer) if expert is None else f"{layer}_expert_{expert}"


def _parse_layer_key(ntype: str, key: str) -> tuple[int, int | None]:
    try:
        if "_expert_" in key:
            layer, expert = key.split("_expert_")
            return int(layer), int(expert)
        return int(key), None
    except ValueError:
        raise ValueError(f"mask entry {ntype}[{key!r}]: layer key must be 'L' or 'L_expert_E' with integers") from None


def _describe(key: NeuronKey) -> str:
    ntype, layer, expert = key
    return f"{ntype}[{layer_key(layer, expert)}]"


def _as_index_tensor(key: NeuronKey, values: Iterable[int]) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ValueError(f"mask entry {_describe(key)}: indices must be integers, got dtype {values.dtype}")
        t = values.detach().to("cpu", torch.int64).flatten()
    else:
        values = list(values)
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            bad = next(v for v in values if not isinstance(v, int) or isinstance(v, bool))
            raise ValueError(f"mask entry {_describe(key)}: indices must be integers, got {bad!r}")
        t = torch.tensor(values, dtype=torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"mask entry {_describe(key)}: negative index {int(t.min())}")
    sorted_t = torch.sort(t).values
    if sorted_t.numel() > 1:
        dup = sorted_t[1:] == sorted_t[:-1]
        if bool(dup.any()):
            raise ValueError(f"mask entry {_describe(key)}: duplicate index {int(sorted_t[1:][dup][0])}")
    return sorted_t


class KeystoneMask:
    """Sets of keystone neurons keyed by ``(type, layer, expert)`` (expert is None outside MoE).

    Args:
        neurons: mapping from ``(type, layer, expert)`` to neuron indices in that type's index
            space (query-head space for attn_k/attn_v). Empty sets are dropped.
        metadata: free-form JSON-serialisable facts (model, selection, IoU, ...). ``sizes``, if
            present, maps ``"type/layerkey"`` to the size of the index space (lets
            :meth:`random_like` work without a model).
    """

    def __init__(self, neurons: Mapping[NeuronKey, Iterable[int]], metadata: dict | None = None):
        self.neurons: dict[NeuronKey, torch.Tensor] = {}
        for raw_key, values in neurons.items():
            key = self._check_key(raw_key)
            idx = _as_index_tensor(key, values)
            if idx.numel():
                self.neurons[key] = idx
        self.neurons = dict(sorted(self.neurons.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or -1)))
        self.metadata = dict(metadata or {})

    @staticmethod
    def _check_key(key) -> NeuronKey:
        if not (isinstance(key, tuple) and len(key) in (2, 3)):
            raise ValueError(f"mask key {key!r} must be (type, layer) or (type, layer, expert)")
        ntype, layer = key[0], key[1]
        expert = key[2] if len(key) == 3 else None
        if ntype not in arch.ALL_TYPES:
            raise ValueError(f"mask key {key!r}: unknown neuron type {ntype!r}; accepted: {', '.join(arch.ALL_TYPES)}")
        if (not isinstance(layer, int) or layer < 0
                or (expert is not None and (not isinstance(expert, int) or expert < 0))):
            raise ValueError(f"mask key {key!r}: layer and expert must be non-negative integers")
        return (ntype, layer, expert)

    # ------------------------------------------------------------------ basic facts
    @property
    def num_neurons(self) -> int:
        return sum(int(v.numel()) for v in self.neurons.values())

    def __len__(self) -> int:
        return self.num_neurons

    def __bool__(self) -> bool:
        return bool(self.neurons)

    def __repr__(self) -> str:
        types = sorted({k[0] for k in self.neurons})
        return f"KeystoneMask({self.num_neurons} neurons in {len(self.neurons)} (type, layer) sets; types={types})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeystoneMask):
            return NotImplemented
        return self.neurons.keys() == other.neurons.keys() and all(
            torch.equal(v, other.neurons[k]) for k, v in self.neurons.items()
        )

    def counts(self) -> dict[NeuronKey, int]:
        return {k: int(v.numel()) for k, v in self.neurons.items()}

    def counts_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (ntype, _, _), v in self.neurons.items():
            out[ntype] = out.get(ntype, 0) + int(v.numel())
        return out

    # ------------------------------------------------------------------ set algebra
    def _combine(self, other: KeystoneMask, op: str) -> KeystoneMask:
        if not isinstance(other, KeystoneMask):
            return NotImplemented
        keys = set(self.neurons) | set(other.neurons)
        empty = torch.empty(0, dtype=torch.int64)
        out = {}
        for k in keys:
            a = set(self.neurons.get(k, empty).tolist())
            b = set(other.neurons.get(k, empty).tolist())
            out[k] = sorted(a | b if op == "|" else a & b if op == "&" else a - b)
        meta = {key: self.metadata[key] for key in ("model", "sizes") if key in self.metadata}
        return KeystoneMask(out, meta)

    def __or__(self, other):
        return self._combine(other, "|")

    def __and__(self, other):
        return self._combine(other, "&")

    def __sub__(self, other):
        return self._combine(other, "-")

    def iou(self, other: KeystoneMask) -> float:
        """Intersection over union of the two neuron sets (1.0 for two empty masks)."""
        union = (self | other).num_neurons
        return 1.0 if union == 0 else (self & other).num_neurons / union

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: Mapping) -> KeystoneMask:
        """Build from the reference layout ``{type: {"layer" | "layer_expert_e": [indices]}}``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"mask must be a dict of {{type: {{layer: [indices]}}}}, got {type(d).__name__}")
        neurons: dict[NeuronKey, list[int]] = {}
        for ntype, per_layer in d.items():
            if ntype == METADATA_KEY:
                continue
            if ntype not in arch.ALL_TYPES:
                raise ValueError(f"mask has unknown neuron type {ntype!r}; accepted: {', '.join(arch.ALL_TYPES)}")
            if not isinstance(per_layer, Mapping):
                raise ValueError(f"mask entry {ntype!r} must map layer keys to index lists")
            for layer_key, values in per_layer.items():
                layer, expert = _parse_layer_key(ntype, str(layer_key))
                if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
                    raise ValueError(f"mask entry {ntype!r} layer {layer_key!r} must be a list of neuron indices, got "
                                     f"{type(values).__name__} {values!r}; write e.g. "
                                     f"{{{ntype!r}: {{{str(layer_key)!r}: "
                                     f"[{values!r}]}}}}")
                neurons[(ntype, layer, expert)] = values
        return cls(neurons, d.get(METADATA_KEY))

    def to_dict(self) -> dict:
        out: dict = {}
        for (ntype, layer, expert), idx in self.neurons.items():
            out.setdefault(ntype, {})[layer_key(layer, expert)] = idx.tolist()
        if self.metadata:
            out[METADATA_KEY] = self.metadata
        return out

    def to_paper_dict(self) -> dict:
        """The paper's layout exactly: ``{type: {"layer" | "layer_expert_e": [indices]}}`` for all six of its
        types (``{}`` where none), no other key. Raises ValueError for types the paper does not have."""
        extra = sorted({k[0] for k in self.neurons} - set(arch.PAPER_TYPES))
        if extra:
            raise ValueError(f"the paper's mask format has only its six types {list(arch.PAPER_TYPES)}; this mask "
                             f"also holds {extra}. Keep the paper's types (KeystoneMask({{k: v for k, v in "
                             "mask.neurons.items() if k[0] in PAPER_TYPES}})) or write without paper_compatible")
        out: dict = {t: {} for t in arch.PAPER_TYPES}
        for (ntype, layer, expert), idx in self.neurons.items():
            out[ntype][layer_key(layer, expert)] = idx.tolist()
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> KeystoneMask:
        """Read a mask; without embedded ``__metadata__``, metadata comes from :func:`sidecar_path` if present."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
        try:
            mask = cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None
        side = sidecar_path(path)
        if isinstance(data, dict) and METADATA_KEY not in data and side.is_file():
            try:
                mask.metadata = dict(json.loads(side.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, TypeError, ValueError) as err:
                raise ValueError(f"{side}: metadata of {path} is not a JSON object ({err})") from None
        return mask

    def to_json(self, path: str | os.PathLike, paper_compatible: bool = False) -> None:
        """Write atomically (a temporary file in the same folder, then rename).

        ``paper_compatible``: the paper's layout (:meth:`to_paper_dict`), which its ``train.py`` loads;
        the metadata goes to :func:`sidecar_path` ``(path)``. Otherwise it is embedded as ``__metadata__``.
        A sidecar left from an earlier write is removed when none is written.
        """
        side = sidecar_path(path)
        if paper_compatible:
            text = json.dumps(self.to_paper_dict(), indent=1)  # raises before anything is written
            if self.metadata:
                atomic_write_text(side, json.dumps(self.metadata, indent=1))
            atomic_write_text(path, text)
            if not self.metadata and side.exists():
                side.unlink()
            return
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        if side.exists():
            side.unlink()

    # ------------------------------------------------------------------ model side
    def slots(self, model: nn.Module, modules: dict | None = None) -> dict[NeuronKey, arch.WeightSlot]:
        family = arch.family_for(model, modules)
        return {k: arch.weight_slot(model, family, *k) for k in self.neurons}

    def validate(self, model: nn.Module, modules: dict | None = None) -> None:
        """Raise ValueError naming the first entry whose module is missing or whose index is out of range."""
        self.weight_indices(model, modules)

    def weight_indices(self, model: nn.Module, modules: dict | None = None) -> dict[str, WeightIndices]:
        """Per 2-D weight key (see :func:`arch.weight_2d`), the rows and columns the mask owns."""
        dims = arch.dims_of(model)
        rows: dict[str, list[torch.Tensor]] = {}
        cols: dict[str, list[torch.Tensor]] = {}
        for key, slot in self.slots(model, modules).items():
            idx = self.neurons[key]
            if int(idx[-1]) >= slot.size:
                raise ValueError(
                    f"mask entry {_describe(key)}: index {int(idx[-1])} out of range for {slot.key} "
                    f"(this type has {slot.size} neurons per layer)"
                )
            mapped = (dims.kv_row(idx) if slot.kv else idx) + slot.offset
            weight, _ = arch.weight_2d(model, slot.key)
            extent = weight.shape[0] if slot.axis == "row" else weight.shape[1]
            if int(mapped.max()) >= extent:
                raise ValueError(f"mask entry {_describe(key)}: maps to {slot.axis} {int(mapped.max())} of {slot.key} "
                                 f"which has only {extent}")
            (rows if slot.axis == "row" else cols).setdefault(slot.key, []).append(mapped)
        empty = torch.empty(0, dtype=torch.int64)
        out = {}
        for wkey in sorted(set(rows) | set(cols)):
            r = torch.unique(torch.cat(rows.get(wkey, [empty])))
            c = torch.unique(torch.cat(cols.get(wkey, [empty])))
            out[wkey] = WeightIndices(r, c)
        return out

    def num_parameters(self, model: nn.Module, modules: dict | None = None, include_bias: bool = True) -> int:
        """Weight elements the mask owns (ownership rule), plus biases of owned rows."""
        total = 0
        for wkey, ind in self.weight_indices(model, modules).items():
            weight, bias = arch.weight_2d(model, wkey)
            total += ind.num_parameters(tuple(weight.shape))
            if include_bias and bias is not None:
                total += len(ind.rows)
        return total

    def index_sizes(self, model: nn.Module, modules: dict | None = None) -> dict[NeuronKey, int]:
        return {k: s.size for k, s in self.slots(model, modules).items()}

    def random_like(self, seed: int = 0, model: nn.Module | None = None, match: str = "weights",
                    modules: dict | None = None) -> KeystoneMask:
        """A random mask of the same shape: the control for ablation and fine-tuning.

        ``match="weights"`` (the fair control, default): per (type, layer, expert), as many neurons as
        this mask and as many distinct weight rows / columns. attn_k / attn_v neurons that share a k / v
        row under GQA (``kv(j)``) are drawn sharing rows the same way, so every projection keeps its row
        and column counts and ``num_parameters(model)`` is equal. Needs ``model``.

        ``match="neurons"``: only the neuron count per key. Random attn_k / attn_v neurons then collide
        less often than keystone ones and own more rows (more trainable weights). Index-space sizes
        come from ``model`` or, without one, from ``metadata["sizes"]``.
        """
        if match not in RANDOM_MATCHES:
            raise ValueError(f"match must be one of {RANDOM_MATCHES}, got {match!r}")
        gen = torch.Generator().manual_seed(seed)
        meta = {"random_seed": seed, "random_match": match,
                **{key: self.metadata[key] for key in ("model", "sizes") if key in self.metadata}}
        if match == "weights":
            if model is None:
                raise ValueError("random_like(match='weights') needs the model (it maps attn_k / attn_v neurons to "
                                 "k / v rows): pass model=..., or match='neurons' to keep only neuron counts")
            self.weight_indices(model, modules)  # validates every entry
            slots, dims = self.slots(model, modules), arch.dims_of(model)
            out = {}
            for k, v in self.neurons.items():
                draw = _random_kv_like(v, dims, gen) if slots[k].kv else torch.randperm(slots[k].size, generator=gen)
                out[k] = draw[: len(v)]
            return KeystoneMask(out, meta)
        if model is not None:
            sizes = self.index_sizes(model, modules)
        else:
            stored = self.metadata.get("sizes")
            if not stored:
                raise ValueError("random_like needs the model (this mask carries no index-space sizes)")
            sizes = {k: int(stored[f"{k[0]}/{layer_key(k[1], k[2])}"]) for k in self.neurons}
        out = {k: torch.randperm(sizes[k], generator=gen)[: len(v)] for k, v in self.neurons.items()}
        return KeystoneMask(out, meta)


def _random_kv_like(idx: torch.Tensor, dims: arch.Dims, gen: torch.Generator) -> torch.Tensor:
    """Random query-space neurons: as many as ``idx`` ([n] int64), on as many distinct k / v rows.

    Row r is read by the ``groups`` channels ``j = ((r // D) * groups + g) * D + r % D``: draw the rows,
    one random reader of each, then the remaining neurons among the other readers of those rows.
    """
    d, groups = dims.head_dim, dims.kv_groups
    n_rows = int(torch.unique(dims.kv_row(idx)).numel())
    rows = torch.randperm(dims.num_kv_heads * d, generator=gen)[:n_rows]
    # [rows, groups]: the readers of each drawn row
    readers = ((rows // d)[:, None] * groups + torch.arange(groups)[None, :]) * d + (rows % d)[:, None]
    readers = readers.gather(1, torch.argsort(torch.rand(readers.shape, generator=gen), dim=1))
    rest = readers[:, 1:].flatten()
    return torch.cat([readers[:, 0], rest[torch.randperm(len(rest), generator=gen)[: len(idx) - n_rows]]])

"""How much prompt groups agree: the overlap figures of the paper, overall, per type and per layer.

For the sets S_1 .. S_G that discovery intersects (one per prompt group), counted over every
(type, layer[, expert]) key k:

- ``iou`` = sum_k |S_1,k & ... & S_G,k| / sum_k |S_1,k | ... | S_G,k| (the paper's ``overall_overlap_rate``);
- ``overlap_vs_single`` = sum_k |intersection_k| / sum_k |S_1,k| (its ``overlap_vs_single_rate``: the
  share of one group's selection that survives the intersection);
- ``pairwise_iou``: the IoU of every pair of groups.

Sums over keys equal plain set sizes, so ``iou`` is |intersection| / |union| of the whole masks. An
empty union gives 0.0, as in the paper's script. The paper's script skips a key that some set
leaves empty (possible with ``global`` / ``global_per_type`` selection, never with ``per_layer``);
``paper_keys=True`` does the same.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ..mask import KeystoneMask, NeuronKey


@dataclass
class OverlapRow:
    """Overlap counts and rates of one slice (everything, one type, or one layer)."""

    intersection: int
    union: int
    single: int  # size of the first set
    pairwise_iou: dict[str, float] = field(default_factory=dict)

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else 0.0

    @property
    def overlap_vs_single(self) -> float:
        return self.intersection / self.single if self.single else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "iou": self.iou, "overlap_vs_single": self.overlap_vs_single}


@dataclass
class Overlap:
    """:func:`overlap` of several masks: ``total``, ``by_type`` (type name) and ``by_layer`` (layer index)."""

    names: list[str]
    total: OverlapRow
    by_type: dict[str, OverlapRow]
    by_layer: dict[int, OverlapRow]

    @property
    def iou(self) -> float:
        return self.total.iou

    @property
    def overlap_vs_single(self) -> float:
        return self.total.overlap_vs_single

    @property
    def pairwise_iou(self) -> dict[str, float]:
        return self.total.pairwise_iou

    def to_dict(self) -> dict:
        return {"names": self.names, "total": self.total.to_dict(),
                "by_type": {t: r.to_dict() for t, r in self.by_type.items()},
                "by_layer": {str(layer): r.to_dict() for layer, r in self.by_layer.items()}}


class _Counts:
    def __init__(self, n: int):
        self.inter = self.union = self.single = 0
        self.pairs = {p: [0, 0] for p in itertools.combinations(range(n), 2)}

    def row(self, names: list[str]) -> OverlapRow:
        pairwise = {f"{names[a]} & {names[b]}": (i / u if u else 0.0) for (a, b), (i, u) in self.pairs.items()}
        return OverlapRow(self.inter, self.union, self.single, pairwise)


def overlap(masks: Mapping[str, KeystoneMask], paper_keys: bool = False) -> Overlap:
    """Overlap figures of ``masks`` (``{name: mask}``, the first one is the "single" reference).

    ``paper_keys``: count only keys that every mask selects from (the paper's script), see the
    module docstring.
    """
    names = list(masks)
    if not names:
        raise ValueError("overlap needs at least one mask")
    sets: list[dict[NeuronKey, set[int]]] = [{k: set(v.tolist()) for k, v in masks[n].neurons.items()} for n in names]
    keys = set().union(*[s.keys() for s in sets])
    if paper_keys:
        keys = {k for k in keys if all(k in s for s in sets)}
    total, by_type, by_layer = _Counts(len(names)), {}, {}
    for key in sorted(keys, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
        per = [s.get(key, set()) for s in sets]
        inter, union = len(set.intersection(*per)), len(set.union(*per))
        pair_counts = {p: (len(per[p[0]] & per[p[1]]), len(per[p[0]] | per[p[1]])) for p in total.pairs}
        n = len(names)
        for counts in (total, by_type.setdefault(key[0], _Counts(n)), by_layer.setdefault(key[1], _Counts(n))):
            counts.inter += inter
            counts.union += union
            counts.single += len(per[0])
            for p, (i, u) in pair_counts.items():
                counts.pairs[p][0] += i
                counts.pairs[p][1] += u
    return Overlap(names, total.row(names), {t: c.row(names) for t, c in by_type.items()},
                   {layer: c.row(names) for layer, c in sorted(by_layer.items())})

"""Text reports of a discovery and of a collapse table, printed by the commands and the demo."""

from __future__ import annotations

from collections import defaultdict

from .utils.tables import format_table

__all__ = ["discovery_summary", "collapse_summary"]


def _pair_range(pairwise: dict[str, float]) -> str:
    return f"{min(pairwise.values()):.2f}-{max(pairwise.values()):.2f}" if pairwise else "-"


def discovery_summary(found) -> str:
    """Neurons per layer (rows) and type (columns) with each layer's IoU, then the groups' overlap:
    IoU, overlap-vs-single and pairwise IoU, overall and per type.

    Args:
        found: what :func:`keystone_kernels.find_keystone` returned.
    """
    mask, ov = found.mask, found.overlap
    types = list(mask.metadata.get("types") or sorted(mask.counts_by_type()))
    per_layer: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (ntype, layer, _), idx in mask.neurons.items():
        per_layer[layer][ntype] += len(idx)
    layers = sorted(set(per_layer) | (set(ov.by_layer) if ov else set()))

    def layer_iou(layer: int) -> list[str]:
        if not ov:
            return []
        return [f"{ov.by_layer[layer].iou:.2f}" if layer in ov.by_layer else "-"]

    rows = [[layer] + [per_layer[layer][t] for t in types] + [sum(per_layer[layer].values())] + layer_iou(layer)
            for layer in layers]
    totals = mask.counts_by_type()
    rows.append(["all"] + [totals.get(t, 0) for t in types] + [mask.num_neurons] + ([f"{ov.iou:.2f}"] if ov else []))
    lines = [format_table(["layer"] + types + ["total"] + (["IoU"] if ov else []), rows), ""]
    lines.append(f"keystone neurons: {mask.num_neurons} of {found.total_neurons} ({100 * found.fraction:.3f}%)")
    vs_single = f", overlap vs single: {ov.overlap_vs_single:.3f}" if ov else ""
    lines.append(f"IoU over all groups: {found.iou:.3f}{vs_single}")
    lines += [f"  IoU {pair}: {v:.3f}" for pair, v in found.pairwise_iou.items()]
    if ov:
        order = [t for t in types if t in ov.by_type] + [t for t in ov.by_type if t not in types]
        by_type = [(t, r.intersection, r.union, f"{r.iou:.3f}", f"{r.overlap_vs_single:.3f}",
                    _pair_range(r.pairwise_iou)) for t, r in ((t, ov.by_type[t]) for t in order)]
        by_type.append(("all", ov.total.intersection, ov.total.union, f"{ov.iou:.3f}", f"{ov.overlap_vs_single:.3f}",
                        _pair_range(ov.pairwise_iou)))
        lines.append(format_table(["type", "intersection", "union", "IoU", "vs single", "pairwise IoU"], by_type))
    if found.recorded_tokens:
        lines.append("recorded tokens per group: " + ", ".join(f"{g} {n}" for g, n in found.recorded_tokens.items()))
    return "\n".join(lines)


def collapse_summary(rows) -> str:
    """The collapse table (base, keystone-ablated, random-ablated) of :func:`keystone_kernels.verify.collapse_table`."""
    return format_table(["condition", "neurons", "weights", "perplexity", "x base"],
                        [(r.condition, r.neurons, r.weights, r.perplexity, r.ratio) for r in rows])

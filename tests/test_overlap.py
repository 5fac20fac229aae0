"""Overlap figures against plain Python sets and against the paper's per-key summation."""

import itertools

import pytest
import torch

from keystone_kernels.analysis.overlap import overlap
from keystone_kernels.mask import KeystoneMask

TYPES = ["attn_q", "attn_k", "fwd_up"]


def _random_masks(seed, n=3, sparse=False):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in range(n):
        neurons = {}
        for t, layer in itertools.product(TYPES, range(3)):
            k = int(torch.randint(0 if sparse else 1, 6, (1,), generator=gen))
            neurons[(t, layer, None)] = torch.randperm(12, generator=gen)[:k]
        masks[f"g{g}"] = KeystoneMask(neurons)
    return masks


def _as_set(mask, keep=lambda key: True):
    return {(k, i) for k, v in mask.neurons.items() if keep(k) for i in v.tolist()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_matches_python_sets_overall_per_type_and_per_layer(seed):
    masks = _random_masks(seed)
    ov = overlap(masks)
    slices = [(ov.total, lambda k: True)]
    slices += [(ov.by_type[t], lambda k, t=t: k[0] == t) for t in TYPES]
    slices += [(ov.by_layer[layer], lambda k, layer=layer: k[1] == layer) for layer in range(3)]
    for row, keep in slices:
        sets = [_as_set(m, keep) for m in masks.values()]
        inter, union = set.intersection(*sets), set.union(*sets)
        assert (row.intersection, row.union, row.single) == (len(inter), len(union), len(sets[0]))
        assert row.iou == pytest.approx(len(inter) / len(union))
        assert row.overlap_vs_single == pytest.approx(len(inter) / len(sets[0]))
        for (a, sa), (b, sb) in itertools.combinations(zip(masks, sets), 2):
            assert row.pairwise_iou[f"{a} & {b}"] == pytest.approx(len(sa & sb) / len(sa | sb))
    assert ov.iou == ov.total.iou and ov.to_dict()["total"]["iou"] == ov.iou


def _paper_overall(masks):
    """The paper's script: per key present in every set, sum |intersection|, |union| and |first set|."""
    dicts = [{k: set(v.tolist()) for k, v in m.neurons.items()} for m in masks.values()]
    keys = set.intersection(*[set(d) for d in dicts])
    inter = sum(len(set.intersection(*[d[k] for d in dicts])) for k in keys)
    union = sum(len(set.union(*[d[k] for d in dicts])) for k in keys)
    single = sum(len(dicts[0][k]) for k in keys)
    return inter / union, inter / single


@pytest.mark.parametrize("seed", [3, 4])
def test_paper_keys_reproduce_the_paper_script_when_some_keys_are_empty(seed):
    masks = _random_masks(seed, sparse=True)  # some (type, layer) sets are empty, as with global selection
    ov = overlap(masks, paper_keys=True)
    iou, vs_single = _paper_overall(masks)
    assert ov.iou == pytest.approx(iou) and ov.overlap_vs_single == pytest.approx(vs_single)
    assert overlap(masks).total.union >= ov.total.union


def test_empty_and_bad_inputs():
    empty = overlap({"a": KeystoneMask({}), "b": KeystoneMask({})})
    assert empty.iou == 0.0 and empty.overlap_vs_single == 0.0  # the paper's convention for an empty union
    with pytest.raises(ValueError, match="at least one mask"):
        overlap({})

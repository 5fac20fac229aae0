"""The flat layout of a group of keystone tensors: where each lives in the arenas and in its frozen weight.

KeystoneAdamW keeps every fp32 tensor of a param group (per device) in flat arenas: one 1-D fp32
tensor each for the masters, the gradients, ``exp_avg`` and ``exp_avg_sq``, with the parameters,
their ``.grad`` and their optimizer state being views into them. A :class:`FlatLayout` says, once,
where tensor k starts in the arenas and where its elements go in its frozen weight, so that one
optimizer step is one kernel launch over the arenas whatever the number of tensors, with no
per-tensor work on the host.

Tables (int64, on the arenas' device, built once and never changed):

- ``segments [S, 10]``, one row per tensor, columns :data:`SEG_COLUMNS`: its arena offset (a
  multiple of :data:`ALIGN` elements, so every tensor starts 64-byte aligned), its 2-D shape
  ``n x m``, where its row / column indices start in ``index`` (-1: all, in order), the frozen
  target's strides, address and dtype code (-1: a tensor with no frozen target, such as a norm
  weight the user chose to train), and the target's position in ``weights``.
- ``index [K]``: every tensor's row and column indices, concatenated.
- ``blocks [B, 2]``: (segment, first element) of every block of :data:`BLOCK` elements, grouped by
  target dtype (``dtype_ranges``) so that a backend with the store type fixed at compile time
  launches once per dtype.

Element e of tensor k (``i = e // m``, ``j = e % m``) is written to
``target[rows[i] or i, cols[j] or j]``; see docs/design.md, section "Fused sparse AdamW".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checks import check_target

__all__ = [
    "ALIGN",
    "BLOCK",
    "SEG_COLUMNS",
    "SCALARS",
    "DTYPE_CODES",
    "Target",
    "FlatLayout",
    "build_flat_layout",
    "host_scalars",
]

ALIGN = 16  # elements: tensors start on 64-byte boundaries in the arenas (vector loads on every backend)
BLOCK = 2048  # elements per entry of the block table (one GPU program / CUDA block each)
SEG_COLUMNS = ("offset", "n", "m", "rows_at", "cols_at", "ws0", "ws1", "waddr", "wdtype", "wslot")
SEG_WIDTH = len(SEG_COLUMNS)
# The per-step scalars of the capturable mode, in this order in a float32 [5] device tensor.
SCALARS = ("decay", "step_size", "bc2_sqrt", "grad_scale", "skip")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class Target:
    """Where a keystone tensor ``[n, m]`` lives: ``weight[rows][:, cols]`` (None: all, in order).

    weight: 2-D ``[out, in]`` float32 / bfloat16 / float16 (a bias is passed as ``bias.view(-1, 1)``).
    rows / cols: sorted unique int64 indices on weight's device, or None.
    """

    weight: Tensor
    rows: Tensor | None
    cols: Tensor | None


@dataclass
class FlatLayout:
    """The placement of S tensors in flat arenas of ``numel`` fp32 elements (see the module docstring)."""

    device: torch.device
    numel: int
    offsets: list[int]
    shapes: list[tuple[int, int]]
    targets: list[Target | None]
    weights: list[Tensor]
    segments: Tensor
    index: Tensor
    blocks: Tensor
    dtype_ranges: dict[int, tuple[int, int]]  # dtype code (-1: no target) -> [first, end) rows of blocks
    backend_cache: dict = field(default_factory=dict, repr=False)  # a backend's own derived tables

    def view(self, arena: Tensor, k: int) -> Tensor:
        """Tensor k's ``[n, m]`` view of a flat arena."""
        n, m = self.shapes[k]
        return arena[self.offsets[k]: self.offsets[k] + n * m].view(n, m)


def build_flat_layout(shapes: list[tuple[int, int]], targets: list[Target | None], device: torch.device) -> FlatLayout:
    """Place tensors of ``shapes`` ([n_k, m_k]) with their frozen ``targets`` (or None) in flat arenas.

    Validates every target once (indices in range, sorted and unique; shape = (len(rows) or out,
    len(cols) or in); same device) with ValueErrors naming the tensor; steps never check again.
    """
    if len(shapes) != len(targets):
        raise ValueError(f"{len(shapes)} shapes but {len(targets)} targets: one per tensor")
    # The concrete device ("cuda" -> "cuda:0"): tensors report an index, and the checks compare with it.
    device = torch.empty(0, device=device).device
    offsets, weights, slot_of, seg_rows, index_parts = [], [], {}, [], []
    offset = index_len = 0
    for k, ((n, m), target) in enumerate(zip(shapes, targets)):
        offsets.append(offset)
        row = [offset, n, m, -1, -1, 0, 0, 0, -1, -1]
        if target is not None:
            w = target.weight
            check_target(w, target.rows, target.cols, (n, m), suffix=f"[{k}]", src_name="tensor")
            if w.device != device:
                raise ValueError(f"the frozen target of tensor {k} is on {w.device}, its arena on {device}")
            if id(w) not in slot_of:
                slot_of[id(w)] = len(weights)
                weights.append(w)
            row[8] = DTYPE_CODES[w.dtype]
            row[9] = slot_of[id(w)]
            row[5], row[6] = w.stride(0), w.stride(1)
            row[7] = w.data_ptr()
            for col, idx in ((3, target.rows), (4, target.cols)):
                if idx is not None:
                    row[col] = index_len
                    index_parts.append(idx)
                    index_len += idx.numel()
        seg_rows.append(row)
        offset += math.ceil(n * m / ALIGN) * ALIGN
    # Blocks grouped by target dtype: each group is one contiguous run of the table.
    blocks, dtype_ranges = [], {}
    for code in sorted({r[8] for r in seg_rows}):
        first = len(blocks)
        for k, r in enumerate(seg_rows):
            if r[8] == code:
                blocks += [(k, start) for start in range(0, r[1] * r[2], BLOCK)]
        if len(blocks) > first:
            dtype_ranges[code] = (first, len(blocks))
    as_table = lambda rows, width: torch.tensor(rows, dtype=torch.int64).reshape(-1, width).to(device)  # noqa: E731
    index = torch.cat([i.to(device) for i in index_parts]) if index_parts else torch.empty(0, dtype=torch.int64)
    return FlatLayout(
        device=device, numel=offset, offsets=offsets, shapes=list(shapes), targets=list(targets), weights=weights,
        segments=as_table(seg_rows, SEG_WIDTH), index=index.to(device), blocks=as_table(blocks, 2),
        dtype_ranges=dtype_ranges,
    )


def host_scalars(lr: float, weight_decay: float, step: int, beta1: float, beta2: float, maximize: bool = False,
                 grad_scale: float = 1.0) -> tuple[float, float, float, float]:
    """``(decay, step_size, bc2_sqrt, grad_scale)`` of one step, in double as torch.optim.AdamW computes them.

    decay = 1 - lr * wd; step_size = lr / (1 - beta1**step); bc2_sqrt = sqrt(1 - beta2**step);
    grad_scale negated for maximize. Kernels round them to fp32.
    """
    if not (isinstance(step, int) or float(step).is_integer()) or step < 1:
        raise ValueError(f"step must be a whole number >= 1 (the 1-based count of this update), got {step}")
    return (1.0 - lr * weight_decay, lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step),
            -grad_scale if maximize else grad_scale)

"""Cost models: bytes an optimizer step moves and FLOPs of the weight gradient and of a train step."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .shapes import Shape


def keystone_tensor_layout(out_features: int, in_features: int, n_rows: int,
                           n_cols: int) -> list[tuple[int, int, int | None, int | None]]:
    """The keystone tensors of one ``[out, in]`` weight with |R| = n_rows, |C| = n_cols (docs/design.md section 1).

    Each entry is ``(n, m, row_indices, col_indices)``: an ``[n, m]`` fp32 tensor and the lengths of
    the index tensors its scatter reads (None: "all, in order", nothing read). A row tensor
    ``[|R|, in]`` addressed by R; a column tensor ``[out - |R|, |C|]`` addressed by the other rows
    (None when R is empty) and C.
    """
    out = []
    if n_rows:
        out.append((n_rows, in_features, n_rows, None))
    if n_cols:
        out.append((out_features - n_rows, n_cols, (out_features - n_rows) if n_rows else None, n_cols))
    return out


def keystone_step_bytes(tensors: Iterable[tuple[int, int, int | None, int | None]], frozen_bytes: int = 2,
                        grad_norm_pass: bool = True, index_bytes: int = 8) -> int:
    """Bytes one KeystoneAdamW step must move (a lower bound: every byte read or written once).

    Per keystone element: the fused pass reads grad, m, v and the fp32 master (16 B), writes m, v
    and the master (12 B) and scatters the rounded value into the frozen weight (``frozen_bytes``,
    2 for bf16): 30 B. KeystoneAdamW also reads every gradient once more for its finiteness check /
    global norm (``grad_norm_pass``: 4 B). Each index tensor is read once (``index_bytes`` per index).
    ``tensors``: ``(n, m, row_indices, col_indices)`` as :func:`keystone_tensor_layout` gives.
    A scattered column write moves a whole cache line / DRAM sector in hardware, so a column-heavy
    mask moves more than this; the model counts useful bytes.
    """
    per_elem = 16 + 12 + frozen_bytes + (4 if grad_norm_pass else 0)
    total = 0
    for n, m, r, c in tensors:
        total += n * m * per_elem + index_bytes * ((r or 0) + (c or 0))
    return total


def dense_adamw_bytes(numel: int, masked: bool = False, mask_bytes: int = 1) -> int:
    """Bytes a dense fp32 AdamW step must move over ``numel`` weights (one fused pass, a lower bound).

    Reads weight, grad, m, v (16 B) and writes weight, m, v (12 B): 28 B per element. ``masked``
    adds the paper's gradient masking pass, ``grad *= mask`` (reads grad and a ``mask_bytes`` mask,
    writes grad: 8 + 1 B for a bool mask). torch's foreach AdamW makes several passes and moves more.
    """
    return numel * (28 + ((8 + mask_bytes) if masked else 0))


def wgrad_flops(tokens: int, out_features: int, in_features: int, n_rows: int | None = None, n_cols: int = 0) -> int:
    """FLOPs of the weight gradient of one ``[out, in]`` linear layer over ``tokens`` tokens.

    ``n_rows=None``: the dense ``dW = dY^T X``, ``2 T out in``. Otherwise the keystone gather:
    rows ``dW[R, :] = dY[:, R]^T X`` (``2 T |R| in``) plus columns of the other rows
    ``dW[notR, C] = dY[:, notR]^T X[:, C]`` (``2 T (out - |R|) |C|``).
    """
    if n_rows is None:
        return 2 * tokens * out_features * in_features
    return 2 * tokens * (n_rows * in_features + (out_features - n_rows) * n_cols)


def train_step_flops(shape: Shape, batch: int, seq: int, keystone_params: int | None = None) -> dict[str, int]:
    """GEMM FLOPs of one train step (forward + backward) of ``shape`` on ``batch x seq`` tokens.

    Matrix products only (norms, activations, softmax and the optimizer are left out). With
    ``T = batch * seq``, ``P`` the projection weights, ``V = vocab * hidden`` the lm_head, and
    ``A = 4 batch seq^2 (heads head_dim)`` per layer for ``QK^T`` and ``PV`` (no causal saving):

    - ``forward = 2 T (P + V) + L A``; ``input_grad = 2 T (P + V) + 2 L A`` (the attention backward
      is four products of the forward's size): both sides pay these;
    - ``weight_grad``: dense ``2 T (P + V)`` (every weight trains; a tied lm_head counted once);
      keystone ``2 T keystone_params`` (embeddings and lm_head frozen).

    ``keystone_params=None`` gives the dense step. Returns the parts and ``total``.
    """
    tokens = batch * seq
    weights = shape.projection_params + shape.vocab * shape.hidden
    attn = shape.layers * 4 * batch * seq * seq * shape.heads * shape.dim_head
    fwd = 2 * tokens * weights + attn
    dx = 2 * tokens * weights + 2 * attn
    dw = 2 * tokens * weights if keystone_params is None else 2 * tokens * keystone_params
    return {"forward": fwd, "input_grad": dx, "weight_grad": dw, "total": fwd + dx + dw}


def train_step_bytes(shape: Shape, side: str, trainable: int, cuda: bool) -> int:
    """Bytes one train step must move for its weights, gradients and optimizer (a lower bound).

    Activations are left out (every side pays about the same). ``W``: the matrix-product weights
    (projections and lm_head, a tied one counted once), ``N``: every parameter, ``c``: bytes of a
    weight as the products read it (bf16 on CUDA: 2, fp32 on the CPU: 4). Every side reads the
    weights in the forward and the input gradient (``2 c W``); then per side:

    - ``dense`` (CUDA: fp32 masters under bf16 autocast): the cast of each weight (read 4, write 2),
      its bf16 weight gradient written and added into the fp32 ``.grad`` (2 + 2 + 4), one fused
      AdamW pass over every parameter (:func:`dense_adamw_bytes`, 28 B); on the CPU the fp32
      gradient (4) and the AdamW pass;
    - ``dense-bf16``: the bf16 weight gradient (2) and AdamW over bf16 weights and moments (read
      weight, grad, m, v, write weight, m, v: 14 B per parameter);
    - ``keystone``: per keystone weight its fp32 gradient (4) and the fused step with its scatter
      (:func:`keystone_step_bytes`: 34 B);
    - ``lora``: per adapter weight (fp32) its cast (6, CUDA), its fp32 gradient (4) and AdamW (28).
    """
    c = 2 if cuda else 4
    weights = shape.projection_params + shape.vocab * shape.hidden
    total = 2 * c * weights
    if side == "dense":
        total += ((6 + 8) if cuda else 4) * weights + dense_adamw_bytes(shape.total_params)
    elif side == "dense-bf16":
        total += 2 * weights + 14 * shape.total_params
    elif side == "keystone":
        total += 4 * trainable + keystone_step_bytes([(trainable, 1, None, None)])
    elif side == "lora":
        total += ((6 if cuda else 0) + 4 + 28) * trainable
    else:
        raise ValueError(f"side must be dense, dense-bf16, keystone or lora, got {side!r}")
    return total


def train_step_bound(shape: Shape, batch: int, seq: int, side: str, trainable: int, *, cuda: bool,
                     bandwidth: float, matmul_rate: float) -> dict[str, float]:
    """The least time one train step can take: its GEMM FLOPs at the measured ``matmul_rate`` (FLOP/s)
    plus its :func:`train_step_bytes` at the measured copy ``bandwidth`` (bytes/s), the two not
    overlapped (a small step runs them one after the other).

    FLOPs: :func:`train_step_flops`; dense sides pay the dense weight gradient, keystone ``2 T`` per
    keystone weight, LoRA ``6 T`` per adapter weight (``x A^T``, ``(x A^T) B^T`` and their gradients).
    Returns ``flops``, ``bytes`` and ``seconds``. The ratio of two sides' seconds is the most one can
    gain over the other on this machine; the GEMM-only ratio (``flops`` alone) misleads where the
    optimizer and the casts dominate, as in a dense step of few tokens.
    """
    tokens = batch * seq
    if side in ("dense", "dense-bf16"):
        flops = train_step_flops(shape, batch, seq)["total"]
    elif side == "keystone":
        flops = train_step_flops(shape, batch, seq, trainable)["total"]
    else:
        part = train_step_flops(shape, batch, seq, 0)
        flops = part["forward"] + part["input_grad"] + 6 * tokens * trainable
    nbytes = train_step_bytes(shape, side, trainable, cuda)
    return {"flops": flops, "bytes": nbytes, "seconds": flops / matmul_rate + nbytes / bandwidth}


def scatter_written_bytes(rows: torch.Tensor | None, cols: torch.Tensor | None, shape: tuple[int, int],
                          strides: tuple[int, int], element_size: int, line: int = 64) -> int:
    """Bytes of memory the scatter of one keystone tensor writes, counted in whole ``line``-byte cache
    lines: a 2-byte store into a line the step touches nowhere else still moves the line.

    The target is a ``shape = (out, in)`` weight with element ``strides``; the tensor writes
    ``W[rows[i], cols[j]]`` (None: every row / column, in order). Its useful bytes are
    ``len(rows) * len(cols) * element_size``; the ratio of the two is what a layout costs beyond them
    (a keystone column of a row-major weight: one line per value, 32x for bf16).
    """
    r = torch.arange(shape[0]) if rows is None else rows.cpu()
    c = torch.arange(shape[1]) if cols is None else cols.cpu()
    if not r.numel() or not c.numel():
        return 0
    byte = (r[:, None] * strides[0] + c[None, :] * strides[1]) * element_size
    return int(torch.unique(byte.flatten() // line).numel()) * line

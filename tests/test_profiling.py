"""utils.profiling.count_device_ops: kernels counted, views and allocations not, backward included."""

from __future__ import annotations

import torch

from keystone_kernels.utils.profiling import count_device_ops


def test_counts_kernels_and_leaves_out_views():
    x = torch.randn(7, 5)

    def work():
        y = x.t()[:, 1:4].unsqueeze(0)  # views only: no kernel
        return (y * 2.0 + 1.0).sum()

    ops = count_device_ops(work)
    assert ops == {"aten.mul": 1, "aten.add": 1, "aten.sum": 1}


def test_counts_the_backward():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 4)
    forward = count_device_ops(lambda: (x @ w.t()).square().sum())
    both = count_device_ops(lambda: (x @ w.t()).square().sum().backward())
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert sum(both.values()) > sum(forward.values())
    assert both["aten.mm"] >= 2  # the forward's and the weight gradient's

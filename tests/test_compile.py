"""torch.compile of a patched model's forward + backward: no graph break, gradients equal to eager."""

from __future__ import annotations

import pytest
import torch
from conftest import gpu, require_backend, requires_cuda
from tiny import tiny_model

from keystone_kernels import KeystoneMask, keystone_parameters, patch

# Every kind of KeystoneLinear: rows only (q_proj, up_proj, o_proj of layer 1), columns only
# (o_proj of layer 0), rows and columns (down_proj of layer 0), including the first and last index.
MASK = {
    ("attn_q", 0, None): [2, 3, 47],
    ("attn_o", 0, None): [0, 29],
    ("fwd_down", 0, None): [5, 7, 11, 71],
    ("res_mlp", 0, None): [1, 30],
    ("fwd_up", 1, None): [0, 4, 9],
    ("res_attn", 1, None): [13],
}


def _patched_llama(backend: str, device: str, dtype=torch.float32):
    model = tiny_model("llama", dtype=dtype).to(device)
    patch(model, KeystoneMask(MASK), frozen_dtype=dtype, backend=backend)
    return model.train()


def _ids(device: str) -> torch.Tensor:
    return torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(7)).to(device)


def _eager_grads(model, loss_fn, ids) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(ids)
    loss.backward()
    grads = [p.grad.clone() for p in keystone_parameters(model)]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("backend,device", [
    pytest.param("reference", "cpu", id="reference-cpu"),
    pytest.param("ext", "cpu", id="ext-cpu"),
    pytest.param("triton", "cpu", id="triton-cpu"),
    pytest.param("ext", "cuda", id="ext-cuda", marks=[gpu, requires_cuda]),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[gpu, requires_cuda]),
])
def test_patched_llama_compiles_without_graph_break(backend, device, monkeypatch):
    """fullgraph aot_eager of forward + backward on every backend (Triton on the CPU: interpreter)."""
    if backend != "reference":
        require_backend(backend, device)
    model = _patched_llama(backend, device)
    ids = _ids(device)

    def loss_fn(inp):
        return model(input_ids=inp, labels=inp).loss

    explanation = torch._dynamo.explain(loss_fn)(ids)
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
    eager_loss, eager = _eager_grads(model, loss_fn, ids)
    assert len(eager) == 6 and all(g.abs().sum() > 0 for g in eager)

    launches = []
    if backend == "triton":  # the compiled backward must run the Triton kernels, not a fallback
        from keystone_kernels.ops.triton import wgrad

        real = wgrad.gather_wgrad
        monkeypatch.setattr(wgrad, "gather_wgrad", lambda *a, **k: launches.append(1) or real(*a, **k))
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(ids)
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager_loss, rtol=1e-6, atol=1e-6)
    for p, g in zip(keystone_parameters(model), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    if backend == "triton":
        assert len(launches) == 6  # one gather per keystone tensor


@gpu
@requires_cuda
def test_triton_inductor_compile_cuda():
    """The GPU-only variant: Inductor (not aot_eager) over the Triton ops, a bf16 model."""
    require_backend("triton", "cuda")
    model = _patched_llama("triton", "cuda", torch.bfloat16)
    ids = _ids("cuda")

    def loss_fn(inp):
        return model(input_ids=inp, labels=inp).loss

    explanation = torch._dynamo.explain(loss_fn)(ids)
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
    eager_loss, eager = _eager_grads(model, loss_fn, ids)
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(ids)
    loss.backward()
    # Inductor fuses and reorders the bf16 elementwise work around the GEMMs: close, not equal.
    torch.testing.assert_close(loss.detach().float(), eager_loss.float(), rtol=2e-2, atol=2e-2)
    for p, g in zip(keystone_parameters(model), eager):
        assert g.abs().sum() > 0
        assert float((p.grad - g).norm() / g.norm()) < 5e-2


_FRESH = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, keystone_kernels as kk
from tiny import tiny_model
assert "torch._dynamo" not in sys.modules, "importing keystone_kernels pulled in torch._dynamo"
model = kk.patch(tiny_model("llama"), kk.KeystoneMask({("attn_q", 0, None): [1, 7], ("fwd_up", 1, None): [0]}),
                 backend=sys.argv[2])
ids = torch.tensor([[5, 6, 7, 8]])
def step(ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss
from keystone_kernels.ops import dispatch
dispatch._routes.clear()  # patch() ran ops eagerly: forget their routes, so tracing resolves them
explain = torch._dynamo.explain(step)(ids)
print("breaks", explain.graph_break_count)
"""


@pytest.mark.parametrize("backend", ["reference", "ext"])
def test_fresh_process_first_op_call_inside_compile_does_not_break(backend):
    """A route first resolved inside the compiled region (it may import Triton, build the extension or
    warn) does not break the graph, and importing the package does not import torch._dynamo."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", _FRESH, str(Path(__file__).parent), backend], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "breaks 0" in proc.stdout, proc.stdout[-2000:]

"""Benchmarks against dense AdamW: optimizer step, weight gradient, full train step, memory, roofline.

Everything is measured side by side in one run and reported as ratios (docs/design.md section 8), on
the shapes of real models built from Transformers configs with random weights (nothing is ever
downloaded):

- **optimizer step**: :class:`~keystone_kernels.KeystoneAdamW` over the keystone tensors of every
  projection against ``torch.optim.AdamW`` (foreach and fused) over the full projection weights,
  with the gradients masked first (what a user of the paper's code runs: dense AdamW, non-keystone
  gradients zeroed after backward) and without masking (plain dense fine-tuning);
- **weight gradient**: the gather kernels (``ops.gather_wgrad``, what ``KeystoneLinear`` runs in
  backward) against the dense ``dW = dY^T X`` GEMMs of one decoder layer;
- **train step** (forward + backward + optimizer): a patched model with KeystoneAdamW against
  dense full fine-tuning with torch AdamW, in a fresh subprocess per side so that peak memory
  (RSS on CPU, ``max_memory_allocated`` on CUDA) belongs to that side alone;
- **the baseline users would pick instead**: PEFT LoRA (r = 8 / 16 / 64 on the same seven
  projections, torch AdamW over the adapters) beside dense and keystone in the train-step
  benchmark, and on CUDA optionally Liger-Kernel rows (:mod:`.baselines`);
- **roofline**: bytes moved by each optimizer step (:func:`keystone_step_bytes`,
  :func:`dense_adamw_bytes`) over the measured device bandwidth, FLOPs of the weight gradient
  (:func:`wgrad_flops`) and of a train step (:func:`train_step_flops`), kernel launches per step
  on CUDA, and the least time a train step can take (:func:`train_step_bound`: its bytes at the
  measured bandwidth plus its GEMM FLOPs at the measured matrix-product rate);
- **every side at its best** (``--train-compiled``): dense AMP eager and compiled, dense in pure
  bf16 compiled, keystone and LoRA eager and compiled, side by side.

The CLI (``keystone-kernels bench``) and the pytest-benchmark suites in ``bench/`` both build on
the functions here.
"""

from __future__ import annotations

from .cli import add_bench_command, cmd_bench, parse_fractions, parse_ranks, parse_train_steps
from .cost import (
    dense_adamw_bytes,
    keystone_step_bytes,
    keystone_tensor_layout,
    scatter_written_bytes,
    train_step_bound,
    train_step_bytes,
    train_step_flops,
    wgrad_flops,
)
from .optimizer import (
    DENSE_IMPLS,
    HOST_COUNTS,
    DenseAdamWSetup,
    KeystoneSetup,
    OptimizerCase,
    bench_host,
    bench_optimizer,
    fit_layers,
    host_layout,
)
from .report import plot, report, summarize
from .run import Plan, bench_backends, make_plan, rerender, run
from .shapes import FRACTIONS, SHAPES, Shape, build_model, layer_mask, synthetic_mask
from .timing import (
    Timing,
    copy_bandwidth,
    count_launches,
    loadavg,
    machine_info,
    matmul_rate,
    measure,
    quiet_stderr,
)
from .train import SIDES, TrainSpec, bench_train, build_train_step, run_train_subprocess, side_label, train_worker
from .wgrad import WGRAD_MM, WgradCase, bench_wgrad

__all__ = [
    "FRACTIONS",
    "Shape",
    "SHAPES",
    "build_model",
    "synthetic_mask",
    "layer_mask",
    "keystone_tensor_layout",
    "keystone_step_bytes",
    "dense_adamw_bytes",
    "wgrad_flops",
    "train_step_flops",
    "train_step_bytes",
    "scatter_written_bytes",
    "train_step_bound",
    "Timing",
    "measure",
    "loadavg",
    "machine_info",
    "copy_bandwidth",
    "matmul_rate",
    "count_launches",
    "OptimizerCase",
    "DenseAdamWSetup",
    "KeystoneSetup",
    "fit_layers",
    "DENSE_IMPLS",
    "bench_optimizer",
    "HOST_COUNTS",
    "host_layout",
    "bench_host",
    "WGRAD_MM",
    "WgradCase",
    "bench_wgrad",
    "TrainSpec",
    "SIDES",
    "side_label",
    "build_train_step",
    "train_worker",
    "run_train_subprocess",
    "bench_train",
    "Plan",
    "bench_backends",
    "make_plan",
    "run",
    "rerender",
    "summarize",
    "report",
    "plot",
    "cmd_bench",
    "add_bench_command",
    "parse_fractions",
    "parse_ranks",
    "parse_train_steps",
    "quiet_stderr",
]

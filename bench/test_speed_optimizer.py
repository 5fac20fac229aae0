"""Optimizer step on SmolLM2-135M shapes: KeystoneAdamW vs torch AdamW over the full projection weights.

``pytest bench/test_speed_optimizer.py --benchmark-only``. extra_info holds the bytes each step
must move (keystone_kernels.bench.keystone_step_bytes / dense_adamw_bytes): divide by the time for
the achieved bandwidth.
"""

import pytest
from benchutil import BACKENDS, FRACTION_IDS, device, require_backend, synced  # noqa: F401 (device: a fixture)

from keystone_kernels.bench import (
    DENSE_IMPLS,
    FRACTIONS,
    SHAPES,
    OptimizerCase,
    dense_adamw_bytes,
    keystone_step_bytes,
)

SHAPE = SHAPES["smollm2-135m"]


@pytest.fixture(scope="module")
def case(device):
    return OptimizerCase.build(SHAPE, SHAPE.layers, device)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("impl", DENSE_IMPLS)
def test_dense_adamw(benchmark, case, impl, masked):
    dense = case.dense(1e-3)
    opt, step = dense.step_fn(impl, masked)
    step()  # allocates the state
    benchmark.group = f"optimizer step {SHAPE.name} {case.device.type}"
    benchmark.extra_info.update(weights=case.numel, bytes_model=dense_adamw_bytes(case.numel, masked))
    benchmark.pedantic(synced(step, case.device), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("fraction", FRACTIONS, ids=[FRACTION_IDS[f] for f in FRACTIONS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keystone_adamw(benchmark, case, backend, fraction):
    require_backend(backend, case.device)
    ks = case.keystone(fraction, backend)
    opt = ks.optimizer(backend)
    opt.step()
    benchmark.group = f"optimizer step {SHAPE.name} {case.device.type}"
    benchmark.extra_info.update(params=sum(p.numel() for p in ks.params), bytes_model=keystone_step_bytes(ks.layout))
    benchmark(synced(opt.step, case.device))

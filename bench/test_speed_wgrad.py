"""Weight gradient of one SmolLM2-135M decoder layer: gather kernels vs the dense dW GEMMs.

``pytest bench/test_speed_wgrad.py --benchmark-only``. CPU: 512 tokens fp32; CUDA: 8192 tokens
bf16. extra_info holds the FLOPs (keystone_kernels.bench.wgrad_flops).
"""

import pytest
from benchutil import BACKENDS, FRACTION_IDS, device, require_backend, synced  # noqa: F401 (device: a fixture)

from keystone_kernels.bench import FRACTIONS, SHAPES, WgradCase

SHAPE = SHAPES["smollm2-135m"]


@pytest.fixture(scope="module")
def case(device):
    return WgradCase.build(SHAPE, 512 if device.type == "cpu" else 8192, device)


def test_dense_wgrad(benchmark, case):
    benchmark.group = f"weight grad {SHAPE.name} layer {case.device.type}"
    benchmark.extra_info.update(flops=case.dense_flops, tokens=case.tokens)
    benchmark(synced(case.dense_fn(), case.device))


@pytest.mark.parametrize("fraction", FRACTIONS, ids=[FRACTION_IDS[f] for f in FRACTIONS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keystone_wgrad(benchmark, case, backend, fraction):
    require_backend(backend, case.device)
    fn, params, flops = case.keystone_fn(fraction, backend)
    benchmark.group = f"weight grad {SHAPE.name} layer {case.device.type}"
    benchmark.extra_info.update(flops=flops, params=params, tokens=case.tokens)
    benchmark(synced(fn, case.device))

"""Full train step (forward + backward + optimizer) on SmolLM2-135M shapes: keystone vs dense AdamW.

``pytest bench/test_speed_train.py --benchmark-only`` (about a minute on a 2-core CPU). Timing only:
peak memory needs a fresh process per side, which ``keystone-kernels bench`` does.
CPU: batch 4 x seq 128; CUDA: batch 4 x seq 512.
"""

import gc

import pytest
from benchutil import device, synced  # noqa: F401 (device: a fixture)

from keystone_kernels.bench import TrainSpec, build_train_step


def _spec(side, device, **kw):
    seq = 128 if device.type == "cpu" else 512
    return TrainSpec("smollm2-135m", side, device=device.type, batch=4, seq=seq, **kw)


def _run(benchmark, spec, device):
    step, info = build_train_step(spec)
    benchmark.group = f"train step smollm2-135m {spec.batch}x{spec.seq} {device.type}"
    benchmark.extra_info.update(tokens=spec.batch * spec.seq, trainable=info["trainable"], optimizer=info["optimizer"])
    benchmark.pedantic(synced(step, device), rounds=3, warmup_rounds=1)
    del step
    gc.collect()


def test_dense_train_step(benchmark, device):
    _run(benchmark, _spec("dense", device), device)


@pytest.mark.parametrize("fraction", [1e-3], ids=["0.1%"])
def test_keystone_train_step(benchmark, device, fraction):
    _run(benchmark, _spec("keystone", device, fraction=fraction, backend="auto"), device)

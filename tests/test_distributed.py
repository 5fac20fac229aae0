"""Several processes on one CPU (gloo, 127.0.0.1): DDP, FSDP2, the replica check, the CLI and Trainer
under torchrun, and faults. Every run has a hard timeout and is killed after it, so nothing can hang CI.

Workers live in ``dist_workers.py``; they only measure, and the asserts are here. The SIGSTOP test
waits ~30 s for the process-group timeout: it starts first (module fixture) and is checked last, so
that its wait overlaps the other tests.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from dist_workers import MASK_SPEC, free_port, kill, start, torchrun_env, wait_all
from tiny import tiny_model, tiny_tokenizer

import keystone_kernels as kk
from keystone_kernels import KeystoneAdamW, KeystoneMask, patch
from keystone_kernels.multigpu import ddp_gradient_bytes
from keystone_kernels.parallel.ddp import ddp_ignored_names, reduction_checksum, tensor_checksums
from keystone_kernels.sft import latest_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

MASK = KeystoneMask({("attn_q", 0, None): [1, 5], ("attn_o", 1, None): [2], ("fwd_up", 1, None): [0, 9]})
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
STOP_TIMEOUT = 30  # --dist-timeout of the SIGSTOP test, seconds


# ---------------------------------------------------------------------------------------- one process


def test_patch_tells_ddp_to_ignore_every_frozen_and_index_buffer():
    model = patch(tiny_model("llama"), MASK, backend="reference")
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    buffers = dict(model.named_buffers())
    assert ignored == set(buffers) == set(ddp_ignored_names(model))  # KeystoneLinear buffers + rotary inv_freq
    assert {n.rsplit(".", 1)[1] for n in ignored} == {"frozen_weight", "rows", "cols", "col_rows", "inv_freq",
                                                      "original_inv_freq"}
    assert not ignored & {n for n, _ in model.named_parameters()}  # parameters still sync at start-up
    kk.merge(model)
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")


def test_checksums_see_one_ulp_and_a_swap():
    w = torch.randn(64, 33).to(torch.bfloat16)
    one_ulp = w.clone()
    one_ulp.view(torch.int16)[5, 7] += 1
    swapped = w.clone()
    swapped[[0, 1]] = w[[1, 0]]
    negzero = torch.zeros(3)
    negzero[1] = -0.0
    cpu = tensor_checksums([w, one_ulp, swapped, w.float(), w.clone(), torch.zeros(3), negzero])
    assert len(set(cpu[:4])) == 4 and cpu[4] == cpu[0] and cpu[5] != cpu[6]
    # the on-device reduction (what GPU tensors use), run here on CPU tensors
    dev = [reduction_checksum(t) for t in (w, one_ulp, swapped, w.clone(), torch.zeros(3), negzero)]
    assert len(set(dev[:3])) == 3 and dev[3] == dev[0] and dev[4] != dev[5]
    (_, n, s1, _), (_, _, s1_swapped, _) = (d.split(":") for d in dev[0:3:2])
    assert int(n) == w.numel() and s1 == s1_swapped  # a swap keeps the plain sum, the weighted sum sees it
    assert kk.check_replicas(patch(tiny_model("llama"), MASK, backend="reference"))  # no process group: a digest


def test_untagged_or_replaced_keystone_tensors_are_refused():
    model = patch(tiny_model("llama"), MASK, backend="reference")
    q = model.model.layers[0].self_attn.q_proj
    old = q.weight_rows
    # what a wrapper replacing parameters does (FSDP1 and torch's fully_shard write _parameters directly;
    # a plain `q.weight_rows = Parameter(...)` goes through register_parameter, which tags the new tensor)
    q._parameters["weight_rows"] = torch.nn.Parameter(old.detach().clone())
    with pytest.raises(ValueError, match="lost its keystone tag .* build the optimizer from keystone_parameters"):
        KeystoneAdamW([q.weight_rows]).step()
    q.weight_rows.grad = torch.ones_like(q.weight_rows)
    with pytest.raises(ValueError, match="lost its keystone tag"):
        KeystoneAdamW([q.weight_rows]).step()
    old.grad = torch.ones_like(old)
    with pytest.raises(ValueError, match="no longer its module's weight_rows"):
        KeystoneAdamW([old]).step()


def test_batch_indices_split_one_global_batch_between_ranks():
    from keystone_kernels.sft import batch_indices

    for index in range(9):  # across epochs too (40 // 6 = 6 batches per epoch)
        whole = batch_indices(40, 6, seed=3, index=index)
        parts = [batch_indices(40, 3, seed=3, index=index, rank=r, world=2) for r in range(2)]
        assert parts[0] + parts[1] == whole and len(set(whole)) == 6


def test_multigpu_figures_follow_from_the_shapes():
    from keystone_kernels.multigpu import figures

    f = figures("smollm2-135m", 0.001, gpus=8)
    k, p = f.keystone_params, 134_515_008  # SmolLM2-135M's parameter count
    assert f.params == p and 0 < k < p // 1000
    assert (f.ddp_keystone_grad_bytes, f.ddp_full_grad_bytes, f.ddp_frozen_broadcast_bytes) == (4 * k, 4 * p, 0)
    assert f.ddp_keystone_wire_bytes == 2 * 7 / 8 * 4 * k  # ring all-reduce, per GPU
    assert f.frozen_bytes_per_gpu_fsdp == 2 * p / 8 and f.keystone_state_bytes == 16 * k
    assert f.fsdp_gather_bytes == 2 * 7 / 8 * 2 * p  # bf16 weights gathered for forward and backward
    assert f.keystone_fsdp_bytes_per_gpu == 2 * p / 8 + 16 * k + f.layer_buffer_bytes
    assert f.dense_ddp_bytes_per_gpu == 18 * p


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist_cli")
    tiny_model("llama").save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(3, 9) for b in range(2, 5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    MASK.to_json(folder / "mask.json")
    return folder


def _sft(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "keystone_kernels", "sft", "--model", str(inputs / "model"), "--data", str(inputs / "train.jsonl"),
            "--batch-size", "2", "--save-every", "2", "--output", str(out), "--backend", "reference", "--no-eval",
            *extra]


def _wait_for(path: Path, procs, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if path.is_file():
            return True
        time.sleep(0.02)
    return path.is_file()


def _wait_for_checkpoint(output: Path, procs, timeout: float) -> bool:
    """Wait until the run in ``output`` has a complete checkpoint (its pointer file appears)."""
    return _wait_for(output / "checkpoints" / "LATEST", procs, timeout) and latest_checkpoint(output) is not None


class _Stopped:
    """A 2-rank ``sft`` run whose rank 1 gets SIGSTOP once training runs; records when rank 0 gives up."""

    def __init__(self, inputs: Path, out: Path):
        self.out = out
        cmd = [sys.executable] + _sft(inputs, out / "run", "--mask", str(inputs / "mask.json"), "--steps", "1000000",
                                      "--dist-timeout", str(STOP_TIMEOUT))
        self.procs = start(cmd, out / "logs")
        self.stopped_at = self.exit_code = self.exited_at = None
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        if not _wait_for_checkpoint(self.out / "run", self.procs, 90):
            return
        os.kill(self.procs[1].pid, signal.SIGSTOP)
        self.stopped_at = time.monotonic()
        try:
            self.exit_code = self.procs[0].wait(timeout=STOP_TIMEOUT + 60)
            self.exited_at = time.monotonic()
        except subprocess.TimeoutExpired:
            pass

    def result(self, timeout: float):
        self.thread.join(timeout)
        kill(self.procs)
        return self.stopped_at, self.exit_code, self.exited_at, (self.out / "logs" / "rank0.log").read_text()


@pytest.fixture(scope="module")
def stopped_run(cli_inputs, tmp_path_factory):
    job = _Stopped(cli_inputs, tmp_path_factory.mktemp("stopped"))
    yield job
    kill(job.procs)


# ---------------------------------------------------------------------------------------- several processes


def test_ddp_fsdp2_replicas_and_trainer_under_torchrun(stopped_run, tmp_path):
    """One torchrun job of 2 ranks runs every scenario of dist_workers.suite; see its docstrings."""
    cmd = TORCHRUN + ["--master-port", str(free_port()), str(Path(__file__).with_name("dist_workers.py")), "suite",
                      str(tmp_path)]
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(cmd, env=torchrun_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    code = wait_all([proc], 120)[0]
    assert code == 0, (tmp_path / "torchrun.log").read_text()[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    b = r0["ddp_bytes"]  # DDP(model) with default arguments
    assert b["hook_bytes_per_step"] == b["keystone_bytes"] > 0  # only the keystone gradients cross
    assert b["keystone_bytes"] == ddp_gradient_bytes(KeystoneMask(MASK_SPEC), tiny_model("llama"))  # the figures' model
    assert b["forward_broadcast_bytes"] == 0 and b["ddp_buffers"] == 0  # nothing broadcast per forward
    assert b["init_broadcast_bytes"] == b["parameter_bytes"]  # start-up: parameters, not the frozen buffers
    for name in ("ddp_equal", "ddp_equal_checkpointing"):
        for r in (r0, r1):
            assert r[name]["ranks_identical"] and r[name]["moved"] > 1e-3
            assert r[name]["max_err_vs_one_process"] <= 1e-6

    for r in (r0, r1):  # a one-ulp difference on rank 1 makes every rank raise, naming the tensor
        assert r["replicas"]["raised"] and "model.layers.1.mlp.down_proj.frozen_weight" in r["replicas"]["raised"]
    assert r0["replicas"]["equal_digest"] == r1["replicas"]["equal_digest"]

    f = r0["fsdp"]
    assert f["local_frozen_share"] == 0.5 and f["keystone_plain"]
    assert f["eval_after"] < f["eval_before"] - 1e-3 and abs(f["eval_after"] - f["eval_one_process"]) <= 1e-6
    assert f["ranks_identical"] and r1["fsdp"]["ranks_identical"] and f["max_err_vs_one_process"] <= 1e-6
    assert f["sync_frozen_unchanged"] and f["ablated_changed"] and f["ablate_restored"] and f["ablated_err"] <= 1e-5
    assert f["adapter_logits_err"] == 0 and f["merged_logits_err"] <= 1e-5
    assert f["sharded_adapter_logits_err"] == 0 and r1["fsdp"]["sharded_adapter_logits_err"] == 0
    assert "save_merged" in f["merge_error"] and "save_merged" in f["save_pretrained_error"]
    assert "keystone_kernels.fully_shard" in f["dtensor_error"]
    g = r0["fsdp_gpt2"]  # Conv1D projections, keystone biases scattered into a sharded frozen bias
    assert g["bias_tensors"] == 3 and g["max_err_vs_one_process"] <= 1e-6 and g["logits_err"] <= 1e-6
    for r in (r0, r1):
        assert r["meta_fsdp"]["logits_err"] == 0 and r["meta_fsdp"]["fingerprint_equal"]
        assert r["meta_fsdp"]["trained_err_vs_one_process"] <= 1e-6

    t = r0["trainer"]
    assert t["world"] == 2 and t["wrapped"] == "DistributedDataParallel" and t["ddp_buffers"] == 0
    assert t["checked"] == 1 and t["ranks_identical"] and r1["trainer"]["ranks_identical"] and t["moved"] > 1e-4
    assert t["checkpoint"] == ["keystone_adapter.safetensors"]


def test_cli_sigkilled_rank_then_resume_under_torchrun(cli_inputs, tmp_path):
    out = tmp_path / "run"
    procs = start([sys.executable] + _sft(cli_inputs, out, "--top-fraction", "0.05", "--steps", "1000000",
                                          "--dist-timeout", "60"), tmp_path / "killed")
    try:
        assert _wait_for_checkpoint(out, procs, 90), (tmp_path / "killed" / "rank0.log").read_text()
        procs[1].kill()
        t0 = time.monotonic()
        code = wait_all(procs[:1], 30)[0]
        waited = time.monotonic() - t0
    finally:
        kill(procs)
    log = (tmp_path / "killed" / "rank0.log").read_text()
    assert code == 2 and waited < 15, (code, waited, log[-3000:])  # the survivor fails within seconds
    assert "another rank died" in log and "--resume" in log
    done = json.loads((latest_checkpoint(out) / "state.json").read_text())
    steps = done["step"] + 3
    cmd = TORCHRUN + ["--master-port", str(free_port())] + _sft(cli_inputs, out, "--steps", str(steps), "--resume",
                                                                "--dist-timeout", "60")
    resumed = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == steps and metrics["losses"][: done["step"]] == done["losses"]
    assert (out / "keystone_adapter.safetensors").is_file() and "outputs in" in resumed.stdout


def test_cli_sigstopped_rank_fails_after_the_timeout(stopped_run):
    stopped_at, code, exited_at, log = stopped_run.result(timeout=STOP_TIMEOUT + 90)
    assert stopped_at is not None, log[-3000:]
    assert code == 2 and exited_at is not None, log[-3000:]
    assert STOP_TIMEOUT - 1 <= exited_at - stopped_at <= 60, exited_at - stopped_at
    assert "Timed out" in log and "--dist-timeout (30.0 s)" in log

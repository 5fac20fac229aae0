"""Multi-process workers for the distributed tests (gloo on 127.0.0.1, CPU), and the launcher they use.

Run as ``python tests/dist_workers.py <scenario> <out_dir>`` in each rank, with the environment
``torchrun`` would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): :func:`launch`
does that. Each rank writes ``<out_dir>/rank<r>.json`` with what it measured; the tests assert on
those files, so a worker never asserts (a failed assert in one rank would leave the other waiting
in a collective). Scenarios:

- ``suite`` (run under torchrun): DDP byte accounting, DDP against one process (with and without
  gradient checkpointing), the replica check, FSDP2 (share, training, adapter, ablate, merged
  save, errors), a meta-device model sharded and loaded from safetensors shards, and
  :class:`KeystoneTrainer`, all in one process group (one start-up of two processes).
- ``trainer``: :class:`KeystoneTrainer` alone.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORLD = 2
STEPS = 3
MASK_SPEC = {("attn_q", 0, None): [1, 5], ("attn_o", 1, None): [2], ("fwd_up", 1, None): [0, 9, 40],
             ("fwd_down", 0, None): [3], ("attn_v", 1, None): [7]}


# ---------------------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank ``rank``: loopback only, one thread per process."""
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               KEYSTONE_BACKEND=os.environ.get("KEYSTONE_BACKEND", "reference"),
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


def torchrun_env() -> dict[str, str]:
    """The environment for a ``torchrun`` command: :func:`rank_env` less what torchrun sets per rank."""
    env = rank_env(0, 1, 0)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    return env


def start(command: list[str], out: Path, world: int = WORLD) -> list[subprocess.Popen]:
    """Start ``command`` once per rank (stdout / stderr to ``out/rank<r>.log``); returns the processes."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for r in range(world):
        log = open(out / f"rank{r}.log", "w")
        procs.append(subprocess.Popen(command, env=rank_env(r, world, port), stdout=log, stderr=subprocess.STDOUT,
                                      cwd=str(ROOT), start_new_session=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes, or None for a process still running after ``timeout`` seconds in all (then killed)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    kill(procs)
    return codes


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL whatever is left of these processes (and what they started), resuming stopped ones."""
    for p in procs:
        if p.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            p.wait()


def launch(scenario: str, out: Path, timeout: float = 90, world: int = WORLD) -> list[dict]:
    """Run a scenario of this module on ``world`` ranks; returns each rank's JSON (raises with the logs on failure)."""
    procs = start([sys.executable, str(Path(__file__).resolve()), scenario, str(out)], out, world)
    codes = wait_all(procs, timeout)
    if codes != [0] * world:
        logs = "\n".join(f"--- rank {r} (exit {c}) ---\n{(out / f'rank{r}.log').read_text()[-4000:]}"
                         for r, c in enumerate(codes))
        raise RuntimeError(f"scenario {scenario!r} failed (None = killed after {timeout} s):\n{logs}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------------------------------- helpers (in a rank)


def _flat(params):
    import torch

    return torch.cat([p.detach().reshape(-1) for p in params])


def _same_on_all_ranks(t) -> bool:
    """All ranks hold bit-identical ``t`` (float32)."""
    import torch
    import torch.distributed as dist

    bits = t.detach().contiguous().view(torch.int32)
    out = [torch.empty_like(bits) for _ in range(dist.get_world_size())]
    dist.all_gather(out, bits)
    return all(torch.equal(o, out[0]) for o in out)


def _batches(steps: int = STEPS, batch: int = 4, length: int = 9):
    import torch

    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 250, (batch, length), generator=gen) for _ in range(steps)]


def _mask():
    from keystone_kernels import KeystoneMask

    return KeystoneMask(MASK_SPEC)


def _train(model, opt, batches, rank: int, world: int, net=None):
    net = net or model
    for ids in batches:
        part = ids.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        net(input_ids=part, labels=part).loss.backward()
        opt.step()


def _reference(base, batches, checkpointing: bool = False, lr: float = 1e-2):
    """One process, the concatenated batches: the model every rank must end with."""
    from keystone_kernels import KeystoneAdamW, keystone_parameters, patch

    model = patch(copy.deepcopy(base), _mask(), backend="reference")
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    opt = KeystoneAdamW(keystone_parameters(model), lr=lr, max_grad_norm=1.0, backend="reference")
    _train(model, opt, batches, 0, 1)
    return model


def _max_err(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# ---------------------------------------------------------------------------------------- scenario: suite


def _ddp_bytes(rank, world) -> dict:
    """Bytes through a DDP comm hook per step, and bytes DDP broadcasts at start-up and per forward."""
    import torch.distributed as dist
    from tiny import tiny_model
    from torch.nn.parallel import DistributedDataParallel as DDP

    from keystone_kernels import KeystoneAdamW, keystone_parameters, patch

    model = patch(tiny_model("llama"), _mask(), backend="reference")
    broadcast = []
    real = dist._broadcast_coalesced

    def counting(group, tensors, *args, **kwargs):
        broadcast.append(sum(t.numel() * t.element_size() for t in tensors))
        return real(group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = counting
    try:
        ddp = DDP(model)  # default arguments, as accelerate and the Trainer build it
        init_bytes, broadcast[:] = sum(broadcast), []
        hooked = []

        def hook(state, bucket):
            buf = bucket.buffer()
            hooked.append(buf.numel() * buf.element_size())
            buf.div_(world)
            return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, hook)
        opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, backend="reference")
        _train(model, opt, _batches(), rank, world, net=ddp)
    finally:
        dist._broadcast_coalesced = real
    frozen_projection_bytes = sum(m.frozen_weight.numel() * m.frozen_weight.element_size()
                                  for m in model.modules() if hasattr(m, "frozen_weight"))
    return {
        "hook_bytes_per_step": sum(hooked) / STEPS,
        "keystone_bytes": sum(p.numel() * 4 for p in keystone_parameters(model)),
        "forward_broadcast_bytes": sum(broadcast),
        "forward_broadcast_calls": len(broadcast),
        "init_broadcast_bytes": init_bytes,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "frozen_projection_bytes": frozen_projection_bytes,
        "ddp_buffers": len(ddp.modules_buffers),
    }


def _ddp_equal(rank, world, base, checkpointing: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from keystone_kernels import KeystoneAdamW, keystone_parameters, patch

    model = patch(copy.deepcopy(base), _mask(), backend="reference")
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    ddp = DDP(model)
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, max_grad_norm=1.0, backend="reference")
    batches = _batches()
    _train(model, opt, batches, rank, world, net=ddp)
    flat = _flat(keystone_parameters(model))
    frozen = _flat(m.frozen_weight.float() for m in model.modules() if hasattr(m, "frozen_weight"))
    out = {"ranks_identical": _same_on_all_ranks(flat) and _same_on_all_ranks(frozen)}
    ref = _reference(base, batches, checkpointing)
    start = _flat(keystone_parameters(patch(copy.deepcopy(base), _mask(), backend="reference")))
    out["max_err_vs_one_process"] = _max_err(flat, _flat(keystone_parameters(ref)))
    out["moved"] = _max_err(flat, start)
    return out


def _replicas(rank, base) -> dict:
    import torch

    from keystone_kernels import check_replicas, patch
    from keystone_kernels.parallel.ddp import ReplicaMismatchError

    model = patch(copy.deepcopy(base), _mask(), backend="reference")
    out = {"equal_digest": check_replicas(model)}
    if rank == 1:  # one bf16 ulp in one frozen element of one rank
        w = model.model.layers[1].mlp.down_proj.frozen_weight
        with torch.no_grad():
            w.view(torch.int16).view(-1)[17] += 1
    try:
        check_replicas(model)
        out["raised"] = None
    except ReplicaMismatchError as err:
        out["raised"] = str(err)
    return out


def _fsdp(rank, world, base, out_dir: Path) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from transformers import AutoModelForCausalLM

    import keystone_kernels as kk
    from keystone_kernels import KeystoneAdamW, keystone_parameters, patch

    out: dict = {}
    model = patch(copy.deepcopy(base), _mask(), backend="reference")
    kk.fully_shard(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    out["local_frozen_share"] = sum(p.to_local().numel() for p in frozen) / sum(p.numel() for p in frozen)
    out["keystone_plain"] = all(type(p).__name__ != "DTensor" for p in keystone_parameters(model))
    opt = KeystoneAdamW(keystone_parameters(model), lr=1e-2, max_grad_norm=1.0, backend="reference")
    batches = _batches()
    ev = batches[0]  # the loss on the first (whole) training batch must fall
    with torch.no_grad():
        out["eval_before"] = float(model(input_ids=ev, labels=ev).loss)
    _train(model, opt, batches, rank, world)
    with torch.no_grad():
        logits = model(input_ids=ev).logits
        out["eval_after"] = float(model(input_ids=ev, labels=ev).loss)
    flat = _flat(keystone_parameters(model))
    out["ranks_identical"] = _same_on_all_ranks(flat)
    ref = _reference(base, batches)
    with torch.no_grad():
        out["eval_one_process"] = float(ref(input_ids=ev, labels=ev).loss)
    out["max_err_vs_one_process"] = _max_err(flat, _flat(keystone_parameters(ref)))

    kk.sync_frozen(model)  # writes this rank's rows again: nothing may change
    with torch.no_grad():
        out["sync_frozen_unchanged"] = bool(torch.equal(model(input_ids=ev).logits, logits))
        with kk.ablate(model, _mask()):
            ablated = float(model(input_ids=ev, labels=ev).loss)
        with kk.ablate(ref, _mask()):
            out["ablated_err"] = abs(ablated - float(ref(input_ids=ev, labels=ev).loss))
        out["ablated_changed"] = ablated != out["eval_after"]
        out["ablate_restored"] = bool(torch.equal(model(input_ids=ev).logits, logits))

    kk.save_adapter(model, out_dir / "adapter.safetensors")  # rank 0 writes
    kk.save_merged(model, out_dir / "merged")  # gathers on every rank, rank 0 writes
    dist.barrier()
    other = kk.fully_shard(patch(copy.deepcopy(base), _mask(), backend="reference"))
    kk.load_adapter(other, out_dir / "adapter.safetensors")  # every rank reads it, writes its rows
    with torch.no_grad():
        out["sharded_adapter_logits_err"] = _max_err(other(input_ids=ev).logits, logits)
    if rank == 0:
        fresh = kk.load_adapter(copy.deepcopy(base), out_dir / "adapter.safetensors", backend="reference")
        merged = AutoModelForCausalLM.from_pretrained(out_dir / "merged")
        with torch.no_grad():
            out["adapter_logits_err"] = _max_err(fresh(input_ids=ev).logits, logits)
            out["merged_logits_err"] = _max_err(merged(input_ids=ev).logits, logits)  # merge keeps the outputs
    for name, fn in (("merge_error", lambda: kk.merge(model)),
                     ("save_pretrained_error", lambda: model.save_pretrained(out_dir / f"plain{rank}"))):
        try:
            fn()
            out[name] = None
        except ValueError as err:
            out[name] = str(err)

    wrong = patch(copy.deepcopy(base), _mask(), backend="reference")  # torch's fully_shard, keystone not ignored
    for layer in wrong.model.layers:
        torch_fully_shard(layer)
    try:
        KeystoneAdamW(keystone_parameters(wrong))
        out["dtensor_error"] = None
    except ValueError as err:
        out["dtensor_error"] = str(err)
    return out


def _fsdp_gpt2(rank, world) -> dict:
    """FSDP2 on GPT-2: Conv1D projections and biases (bias_rows scattered into a sharded 1-D frozen bias)."""
    import torch
    from tiny import tiny_model

    import keystone_kernels as kk

    base = tiny_model("gpt2")
    for m in base.modules():  # dropout would make ranks and the reference differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = kk.patch(copy.deepcopy(base), _mask(), backend="reference")
    kk.fully_shard(model)
    opt = kk.KeystoneAdamW(kk.keystone_parameters(model), lr=1e-2, max_grad_norm=1.0, backend="reference")
    batches = _batches()
    model.train()
    _train(model, opt, batches, rank, world)
    ref = _reference(base, batches)
    ev = batches[0]
    with torch.no_grad():
        err = _max_err(model(input_ids=ev).logits, ref(input_ids=ev).logits)
    biases = [m for m in model.modules() if getattr(m, "bias_rows", None) is not None]
    return {"max_err_vs_one_process": _max_err(_flat(kk.keystone_parameters(model)),
                                               _flat(kk.keystone_parameters(ref))),
            "logits_err": err, "bias_tensors": len(biases)}


def _meta_fsdp(rank, base, out_dir: Path) -> dict:
    """Built on meta, patched, sharded, then loaded from two safetensors shards: equals the loaded model."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import keystone_kernels as kk
    from keystone_kernels import patch

    folder = out_dir / "base"
    if rank == 0:
        folder.mkdir(exist_ok=True)
        sd = {k: v.contiguous() for k, v in base.state_dict().items()}
        keys = sorted(sd)
        save_file({k: sd[k] for k in keys[::2]}, str(folder / "model-00001-of-00002.safetensors"))
        save_file({k: sd[k] for k in keys[1::2]}, str(folder / "model-00002-of-00002.safetensors"))
    dist.barrier()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base.config)
    patch(model, _mask(), backend="reference")
    kk.fully_shard(model)
    kk.load_base_weights(model, folder, device="cpu")
    want = patch(copy.deepcopy(base), _mask(), backend="reference")
    ev = _batches(1, batch=2, length=11)[0]
    with torch.no_grad():
        err = _max_err(model(input_ids=ev).logits, want(input_ids=ev).logits)
    opt = kk.KeystoneAdamW(kk.keystone_parameters(model), lr=1e-2, max_grad_norm=1.0, backend="reference")
    batches = _batches()
    _train(model, opt, batches, rank, dist.get_world_size())  # the keystone tensors were re-created by to_empty
    trained = _max_err(_flat(kk.keystone_parameters(model)), _flat(kk.keystone_parameters(_reference(base, batches))))
    return {"logits_err": err, "fingerprint_equal": model._keystone.base_fingerprint == want._keystone.base_fingerprint,
            "trained_err_vs_one_process": trained}


def suite(out_dir: Path) -> dict:
    import torch.distributed as dist
    from tiny import tiny_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = tiny_model("llama")
    timings, result = {}, {}
    for name, fn in [("ddp_bytes", lambda: _ddp_bytes(rank, world)),
                     ("ddp_equal", lambda: _ddp_equal(rank, world, base, False)),
                     ("ddp_equal_checkpointing", lambda: _ddp_equal(rank, world, base, True)),
                     ("replicas", lambda: _replicas(rank, base)),
                     ("fsdp", lambda: _fsdp(rank, world, base, out_dir)),
                     ("fsdp_gpt2", lambda: _fsdp_gpt2(rank, world)),
                     ("meta_fsdp", lambda: _meta_fsdp(rank, base, out_dir)),
                     ("trainer", lambda: trainer(out_dir))]:
        t0 = time.perf_counter()
        result[name] = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
    result["seconds"] = timings
    dist.destroy_process_group()
    return result


# ---------------------------------------------------------------------------------------- scenario: trainer


def trainer(out_dir: Path) -> dict:
    """KeystoneTrainer as a torchrun user runs it: DDP from the Trainer, adapter checkpoints from rank 0."""
    import torch
    from tiny import tiny_model, tiny_tokenizer
    from transformers import TrainingArguments

    from keystone_kernels import keystone_parameters, patch
    from keystone_kernels.integrations import trainer as kt
    from keystone_kernels.sft_data import SFTDataset, collate

    checked = []
    real_check = kt.check_replicas
    kt.check_replicas = lambda model: checked.append(1) or real_check(model)
    tok = tiny_tokenizer()
    model = patch(tiny_model("llama"), _mask(), backend="reference")
    rows = [{"prompt": f"{a} plus {b}?", "response": f"{a + b}"} for a in range(2, 8) for b in range(3, 6)]
    data = list(SFTDataset(rows, tok))
    args = TrainingArguments(output_dir=str(out_dir / "trainer"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=5e-3, report_to=[], use_cpu=True, logging_strategy="no",
                             save_strategy="steps", save_steps=3, remove_unused_columns=False, ddp_backend="gloo")
    t = kt.KeystoneTrainer(model=model, args=args, train_dataset=data,
                           data_collator=lambda ex: collate(ex, tok.pad_token_id))
    before = _flat(keystone_parameters(model)).clone()
    t.train()
    flat = _flat(keystone_parameters(model))
    wrapped = t.model_wrapped
    return {"world": torch.distributed.get_world_size(), "wrapped": type(wrapped).__name__,
            "ddp_buffers": len(getattr(wrapped, "modules_buffers", [None])), "checked": len(checked),
            "ranks_identical": _same_on_all_ranks(flat), "moved": _max_err(flat, before),
            "checkpoint": sorted(p.name for p in (out_dir / "trainer").glob("checkpoint-*/*adapter*"))}


SCENARIOS = {"suite": suite, "trainer": trainer}

if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(ROOT)]
    scenario, out = sys.argv[1], Path(sys.argv[2])
    result = SCENARIOS[scenario](out)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))

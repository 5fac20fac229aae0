"""Every import points down: the package's import graph read with ``ast`` and checked against one layer list.

:data:`LAYERS` is the one place that orders the package, bottom first (docs/design.md section 2 draws
it). A module may import only modules listed before it, so the graph has no cycle and no upward
edge; a new module must be placed here before it can be imported. Also checked: no private name
imported from another module, no package import inside a function (except :data:`LAZY_PACKAGE`),
and third-party imports inside functions only for the reasons in :data:`LAZY_THIRD_PARTY`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from import_graph import imports, module_names

import keystone_kernels as kk

PACKAGE = Path(kk.__file__).resolve().parent

LAYERS = [
    # the bottom: small utilities, nothing else of the package
    "utils.io", "utils.dist", "utils.dtensor", "utils.peft", "utils.tables", "utils.profiling", "utils",
    # ops: one contract, three backends; nothing here knows about models
    "ops.checks", "ops.layout", "ops.reference", "ops.ext",
    "ops.triton._common", "ops.triton.scatter", "ops.triton.wgrad", "ops.triton.adamw", "ops.triton",
    "ops.dispatch", "ops",
    # which model, where its projections are, which neurons
    "arch", "mask", "models",
    # the layer: its tensors, the hooks that keep it in sync, KeystoneLinear
    "nn.parameter", "nn.hooks", "nn.linear", "nn",
    # the state of a patched model
    "state",
    "optim.state_checks", "optim.adamw", "optim",
    "serialization.adapter", "serialization.export", "serialization",
    "parallel.ddp", "parallel.loading", "parallel.fsdp", "parallel",
    "analysis.probe", "analysis.decoding", "analysis.overlap", "analysis.discovery", "analysis.verify", "analysis",
    # the top of the model layers: patch / merge / load_adapter
    "patching",
    "integrations.lora", "integrations.trainer", "integrations",
    # applications
    "checkpoints", "sft_data", "tasks", "sft_config", "sft_modes", "sft_runs", "sft", "compare", "reports", "demo",
    "bench.shapes", "bench.cost", "bench.timing", "bench.baselines", "bench.report", "bench.optimizer",
    "bench.wgrad", "bench.train", "bench.run", "bench.cli", "bench",
    "multigpu", "commands", "cli", "__main__",
    "",  # keystone_kernels itself: the public API
]

# Package imports allowed inside a function: (importer, imported), each with its reason.
LAZY_PACKAGE = {
    ("ops.dispatch", "ops.triton"): "triton is optional: the Triton backend is imported on first use",
    ("ops.dispatch", "ops.triton._common"): "the same, for its interpreter check",
}

# Third-party modules that may be imported inside a function, and why (seconds measured on the 2-core
# dev machine, on top of an imported torch).
LAZY_THIRD_PARTY = {
    "transformers": "2.5 s to import; only code that builds or inspects a model needs it",
    "torch.distributed.tensor": "2.8 s to import; no DTensor exists until someone imported it",
    "torch.distributed.fsdp": "imports torch.distributed.tensor",
    "torch.distributed.device_mesh": "imports torch.distributed.tensor",
    "datasets": "0.7 s; only for CSV / Parquet / JSON data files",
    "matplotlib": "optional ([plot]); 0.5 s",
    "torch.utils.cpp_extension": "0.15 s; only when the C++ extension is built",
    "peft": "optional ([peft])",
    "triton": "optional (Linux, GPU)",
    "liger_kernel": "optional ([liger], GPU)",
}


MODULES = module_names(PACKAGE)


def test_every_module_is_placed_once():
    assert len(LAYERS) == len(set(LAYERS)), "a module is listed twice"
    assert set(LAYERS) == set(MODULES), (f"not placed: {sorted(set(MODULES) - set(LAYERS))}; "
                                         f"listed but missing: {sorted(set(LAYERS) - set(MODULES))}")


def test_design_doc_names_every_module():
    """docs/design.md section 2 names each module in backticks by its dotted name (``utils.io``; the package
    itself as ``keystone_kernels``)."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("\n## 2.", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([^`\s]+)`", section))
    missing = sorted(name or "keystone_kernels" for name in MODULES if (name or "keystone_kernels") not in named)
    assert not missing, f"docs/design.md section 2 does not name: {missing}"


@pytest.mark.parametrize("name", LAYERS)
def test_imports_point_down(name):
    rank = {m: i for i, m in enumerate(LAYERS)}
    problems = []
    for target, symbol, lazy, line, relative in imports(MODULES, name):
        top = target.split(".")[0]
        if relative:
            if target not in rank:
                problems.append(f"line {line}: {target} is not a module of the package")
            elif rank[target] >= rank[name]:
                problems.append(f"line {line}: imports {target or 'keystone_kernels'}, which is not below it")
            if symbol and symbol.startswith("_") and not symbol.startswith("__"):
                problems.append(f"line {line}: imports the private name {symbol} from {target}")
            if lazy and (name, target) not in LAZY_PACKAGE:
                problems.append(f"line {line}: imports {target} inside a function")
        elif top == "keystone_kernels":
            problems.append(f"line {line}: imports its own package by absolute name ({target})")
        elif lazy and not any(t == m or t.startswith(m + ".") for m in LAZY_THIRD_PARTY
                              for t in (target, f"{target}.{symbol}")):
            problems.append(f"line {line}: imports {target} inside a function, with no reason in LAZY_THIRD_PARTY")
    assert not problems, f"keystone_kernels.{name}".rstrip(".") + ":\n" + "\n".join(problems)


# The public API: ``import keystone_kernels as kk`` must keep offering exactly these names.
PUBLIC = [
    "ALL_TYPES", "PAPER_TYPES", "RESIDUAL_TYPES", "Discovery", "KeystoneAdamW", "KeystoneLinear", "KeystoneMask",
    "KeystoneParameter", "Overlap", "ablate", "check_replicas", "collapse_table", "default_prompts", "default_texts",
    "evaluate_perplexity", "find_keystone", "fully_shard", "keystone_parameters", "load_adapter",
    "load_base_weights", "load_default_model", "load_model", "merge", "overlap", "patch", "save_adapter",
    "save_merged", "scale", "score_exact_match", "score_multiple_choice", "select_top", "sync_frozen",
]


def test_the_public_api_is_unchanged():
    assert sorted(kk.__all__) == sorted(PUBLIC)
    assert all(getattr(kk, name, None) is not None for name in PUBLIC)

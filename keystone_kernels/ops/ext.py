"""The ``ext`` backend: the C++ (and, where built, CUDA) extension in ``csrc/``.

Loading order, first that works wins:

1. ops already registered in this process (``torch.ops.keystone``);
2. a prebuilt library ``keystone_kernels/_C*.so`` that ``setup.py`` built ahead of time
   (``KEYSTONE_BUILD_EXT=1 pip install .``);
3. a just-in-time build with ninja (``torch.utils.cpp_extension.load``), cached in
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/keystone_kernels/torch_extensions``) and rebuilt
   only when a source or flag changes.

CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit is found (``CUDA_HOME``);
``KEYSTONE_BUILD_CUDA=1`` demands them (an error if they cannot be built), ``=0`` leaves them out.
When CUDA was only opportunistic and its build fails, the CPU kernels are built alone, with a
warning.
Sources come from ``keystone_kernels/csrc`` in an installed wheel (setup.py copies them there as
package data) or from ``<repo>/csrc`` in a checkout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from .layout import BLOCK

__all__ = [
    "ExtensionUnavailable",
    "csrc_dir",
    "sources",
    "cxx_flags",
    "nvcc_flags",
    "cuda_toolkit_available",
    "want_cuda",
    "load",
    "is_available",
    "has_cuda",
    "gather_wgrad",
    "scatter_to_frozen",
    "fused_adamw_scatter",
]

_NAMESPACE = "keystone"
_OPS = ("gather_wgrad", "scatter_to_frozen", "fused_adamw_scatter")
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # keystone_kernels/

_lock = threading.Lock()
_loaded_from: str | None = None
_load_error: Exception | None = None
_fakes_registered = False


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could neither be loaded prebuilt nor built just in time."""


def csrc_dir() -> Path:
    """Where the C++/CUDA sources are: the wheel's package data, else the repository checkout."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "keystone.cpp").is_file():
            return candidate
    raise ExtensionUnavailable(
        f"keystone C++ sources not found: looked for keystone.cpp in {_PACKAGE_DIR / 'csrc'} (installed wheel) "
        f"and {_PACKAGE_DIR.parent / 'csrc'} (repository checkout)"
    )


def cuda_toolkit_available() -> bool:
    """True when torch is a CUDA build and a CUDA toolkit (nvcc) is found."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _cuda_demand() -> bool | None:
    """``$KEYSTONE_BUILD_CUDA``: True (1/true/yes/on), False (0/false/no/off) or None (unset: auto)."""
    value = os.environ.get("KEYSTONE_BUILD_CUDA", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def want_cuda() -> bool:
    """Whether to compile the CUDA kernels: ``$KEYSTONE_BUILD_CUDA`` 1 / 0, else when a toolkit is found.

    Raises ExtensionUnavailable when CUDA is demanded (1) but torch or the toolkit cannot build it.
    """
    demand = _cuda_demand()
    if demand is False:
        return False
    available = cuda_toolkit_available()
    if demand and not available:
        raise ExtensionUnavailable(
            "KEYSTONE_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            + ("this torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)")
        )
    return available


def sources(root: Path | None = None, with_cuda: bool = False) -> list[str]:
    """The source files of the extension, CPU first; CUDA kernels and their binding if asked."""
    root = csrc_dir() if root is None else Path(root)
    files = [root / "keystone.cpp", root / "linear.cpp"]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu")) + [root / "cuda" / "keystone_cuda.cpp"]
    return [str(f) for f in files]


def cxx_flags() -> list[str]:
    # -O3 lets GCC vectorise the AdamW loops; -fno-math-errno lets it vectorise sqrt;
    # -ffp-contract=off keeps a * b + c unfused except where keystone.cpp fuses on purpose (to
    # round like torch's own kernels). No -march=native: the library must run on any x86-64 it is
    # copied to (an AVX2 copy of the AdamW loop is chosen at run time, see keystone.cpp).
    return ["-O3", "-fno-math-errno", "-ffp-contract=off"]


def nvcc_flags() -> list[str]:
    # No --use_fast_math: AdamW must match torch's IEEE division and sqrt.
    return ["-O3", "-lineinfo"]  # torch adds -std=c++20


def _extensions_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "keystone_kernels", "torch_extensions")
    # One subfolder per interpreter / torch build: a library built against another ABI must not load.
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    return Path(root) / tag


def _has_kernels(dispatch_key: str) -> bool:
    try:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{op}", dispatch_key) for op in _OPS
        )
    except RuntimeError:  # "operator ... does not exist": nothing registered yet
        return False


def _find_prebuilt() -> str | None:
    try:
        spec = importlib.util.find_spec("keystone_kernels._C")
    except (ImportError, ValueError):
        return None
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        return spec.origin
    return None


def _jit_build(verbose: bool) -> str:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionUnavailable(
            f"cannot build the keystone C++ extension: C++ compiler {cxx!r} not found on PATH "
            "(install g++ or set CXX), or use backend='reference'"
        )
    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable(
            "cannot build the keystone C++ extension: ninja not found (pip install ninja), "
            "or use backend='reference'"
        )
    with_cuda = want_cuda()
    try:
        return _build(with_cuda, verbose)
    except ExtensionUnavailable as err:
        if not with_cuda or _cuda_demand():
            raise
        # CUDA was only opportunistic: keep the CPU kernels rather than lose the whole extension.
        warnings.warn(f"{err}; building the CPU kernels only", stacklevel=3)
        return _build(False, verbose)


def _build(with_cuda: bool, verbose: bool) -> str:
    from torch.utils import cpp_extension

    name = "keystone_ext_cuda" if with_cuda else "keystone_ext_cpu"
    build_dir = _extensions_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        # torch's JIT cache hashes the sources, not the headers they include: fold the headers'
        # digest into the flags so that a header-only change rebuilds too.
        digest = hashlib.sha1(b"".join(h.read_bytes() for h in sorted(csrc_dir().rglob("*.h")))).hexdigest()[:12]
        cpp_extension.load(
            name=name,
            sources=sources(with_cuda=with_cuda),
            extra_cflags=cxx_flags() + [f"-DKEYSTONE_HEADERS_DIGEST={digest}"],
            extra_cuda_cflags=nvcc_flags() + [f"-DKEYSTONE_HEADERS_DIGEST={digest}"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as err:  # a compiler error: keep its text, say where the build ran
        raise ExtensionUnavailable(f"building the keystone C++ extension in {build_dir} failed: {err}") from err
    return str(build_dir)


def _register_fakes() -> None:
    """Shape functions so that torch.compile / FakeTensor can trace the ops without running them."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake(f"{_NAMESPACE}::gather_wgrad")
    def _(grad_out, x, rows, cols):
        torch._check(grad_out.dim() == 2 and x.dim() == 2, lambda: "grad_out and x must be 2-D")
        torch._check(grad_out.shape[0] == x.shape[0], lambda: "grad_out and x must have the same T")
        n = grad_out.shape[1] if rows is None else rows.shape[0]
        m = x.shape[1] if cols is None else cols.shape[0]
        return grad_out.new_empty((n, m), dtype=torch.float32)

    @torch.library.register_fake(f"{_NAMESPACE}::scatter_to_frozen")
    def _(weight, src, rows, cols):
        return None

    @torch.library.register_fake(f"{_NAMESPACE}::fused_adamw_scatter")
    def _(master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, weights, segments, index, blocks, scalars, block, decay,
          step_size, bc2_sqrt, grad_scale, beta1, beta2, eps):
        return None

    _fakes_registered = True


def load(verbose: bool = False) -> str:
    """Make ``torch.ops.keystone`` available; returns where it came from. Raises ExtensionUnavailable."""
    global _loaded_from, _load_error
    if _loaded_from is not None:  # hot path, lock-free: every op call (and torch.compile tracing) comes here
        return _loaded_from
    with _lock:
        if _loaded_from is not None:
            return _loaded_from
        if _load_error is not None:
            raise _load_error
        try:
            if _has_kernels("CPU"):
                origin = "already registered"
            else:
                origin = None
                prebuilt = _find_prebuilt()
                if prebuilt is not None:
                    try:
                        torch.ops.load_library(prebuilt)
                        origin = prebuilt
                    except OSError as err:  # built against another torch: rebuild rather than fail
                        warnings.warn(f"prebuilt keystone extension {prebuilt} failed to load ({err}); "
                                      "building it just in time instead", stacklevel=2)
                if origin is None:
                    origin = _jit_build(verbose)
            _register_fakes()
        except ExtensionUnavailable as err:
            _load_error = err
            raise
        _loaded_from = origin
        return origin


def is_available() -> bool:
    """True when the extension is loaded or can be loaded (this may build it, once)."""
    try:
        load()
    except ExtensionUnavailable:
        return False
    return True


def has_cuda() -> bool:
    """True when the loaded extension has CUDA kernels."""
    return is_available() and _has_kernels("CUDA")


_linear: list = []  # [] until looked up, then [torch.ops.keystone.linear or None]


def linear_op():
    """``torch.ops.keystone.linear`` (KeystoneLinear's forward and backward in C++, csrc/linear.cpp), or None for a
    prebuilt library older than it (KeystoneLinear then runs its Python autograd function)."""
    if not _linear:
        load()
        try:
            _linear.append(torch.ops.keystone.linear.default)  # the overload itself: no resolution per call
        except (AttributeError, RuntimeError):
            _linear.append(None)
    return _linear[0]


def gather_wgrad(grad_out, x, rows, cols):
    load()
    return torch.ops.keystone.gather_wgrad(grad_out, x, rows, cols)


def scatter_to_frozen(weight, src, rows, cols):
    load()
    torch.ops.keystone.scatter_to_frozen(weight, src, rows, cols)


def fused_adamw_scatter(layout, master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, beta1, beta2, eps):
    load()
    host = (0.0, 0.0, 0.0, 0.0) if isinstance(scalars, torch.Tensor) else scalars
    torch.ops.keystone.fused_adamw_scatter(
        master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, layout.weights, layout.segments, layout.index,
        layout.blocks, scalars if isinstance(scalars, torch.Tensor) else None, BLOCK, *host, beta1, beta2, eps,
    )

"""Build script. Metadata lives in pyproject.toml; this file adds two things:

1. The C++/CUDA sources in ``csrc/`` travel inside the package as ``keystone_kernels/csrc`` (wheel
   and sdist), so an installed copy can build the extension just in time on first use.
2. With ``KEYSTONE_BUILD_EXT=1`` the extension is built ahead of time as ``keystone_kernels._C``::

       KEYSTONE_BUILD_EXT=1 pip install --no-build-isolation .

   (``--no-build-isolation``: the build needs the torch it will run with.) CUDA kernels are
   included when torch is a CUDA build and a CUDA toolkit is found (``CUDA_HOME``), decided from
   the toolkit, not from a visible GPU. ``KEYSTONE_BUILD_CUDA=1`` demands them (the build fails
   if they cannot be built), ``KEYSTONE_BUILD_CUDA=0`` leaves them out. ``TORCH_CUDA_ARCH_LIST``
   picks the GPU architectures as usual for torch extensions.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
SOURCE_PATTERNS = ("*.cpp", "*.h", "cuda/*.cu", "cuda/*.cpp", "cuda/*.h")


def _csrc_files() -> list[Path]:
    return sorted(f for pattern in SOURCE_PATTERNS for f in CSRC.glob(pattern))


def _copy_csrc(dest: Path) -> None:
    for src in _csrc_files():
        target = dest / src.relative_to(CSRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


class BuildPyWithSources(build_py):
    """Also place csrc/ in the built package as keystone_kernels/csrc (what ops/ext.py looks for)."""

    def run(self):
        super().run()
        _copy_csrc(Path(self.build_lib) / "keystone_kernels" / "csrc")


class SdistWithSources(sdist):
    """Ship csrc/ and this script in the sdist so that a wheel built from it has the sources too."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        _copy_csrc(Path(base_dir) / "csrc")


def _truthy(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value not in ("0", "false", "no", "off")


def _ext_helpers():
    """keystone_kernels/ops/ext.py loaded by path: the flags and source list of the JIT build,
    without importing the package (its __init__ needs the full dependency set)."""
    spec = importlib.util.spec_from_file_location("_keystone_ext_build", HERE / "keystone_kernels" / "ops" / "ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions() -> tuple[list, dict]:
    if not _truthy("KEYSTONE_BUILD_EXT"):
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError as err:
        raise RuntimeError(
            "KEYSTONE_BUILD_EXT=1 needs torch at build time: install torch first and build with "
            "`pip install --no-build-isolation .`"
        ) from err
    helpers = _ext_helpers()
    with_cuda = helpers.want_cuda()  # raises when KEYSTONE_BUILD_CUDA=1 and CUDA cannot be built
    sources = [os.path.relpath(s, HERE) for s in helpers.sources(CSRC, with_cuda=with_cuda)]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "keystone_kernels._C",
            sources,
            extra_compile_args={"cxx": helpers.cxx_flags(), "nvcc": helpers.nvcc_flags()},
        )
    else:
        ext = cpp_extension.CppExtension("keystone_kernels._C", sources,
                                         extra_compile_args={"cxx": helpers.cxx_flags()})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, ext_cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, "sdist": SdistWithSources, **ext_cmdclass},
)

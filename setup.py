"""Build script: package metadata lives in pyproject.toml; this file builds the native kernels.

``pip install --no-build-isolation -e .`` (torch already installed) compiles the extension
``trm._C`` ahead of time from ``csrc/`` (see ``csrc/build_config.py``):

- C++ CPU kernels always;
- CUDA kernels too when a CUDA toolkit is found (``CUDA_HOME``; default ``/usr/local/cuda``),
  for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``), unless ``TRM_SKIP_CUDA_BUILD=1``;
- nothing with ``TRM_SKIP_NATIVE_BUILD=1``.

ninja compiles the sources in parallel (``MAX_JOBS`` caps the jobs). When torch is NOT
importable here (pip's default build isolation runs this in a fresh environment without it),
the package installs as pure Python and ``trm.ops`` JIT-builds the same sources on first use
(``trm/ops/native.py``), which needs a compiler and ninja at run time instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _say(msg: str) -> None:
    print(f"trm setup.py: {msg}", file=sys.stderr, flush=True)


def _load_build_config():
    spec = importlib.util.spec_from_file_location("trm_build_config", ROOT / "csrc" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_build() -> dict:
    """``setup()`` keyword arguments that add ``trm._C``, or ``{}`` for a pure-Python install."""
    if os.environ.get("TRM_SKIP_NATIVE_BUILD") == "1":
        _say("TRM_SKIP_NATIVE_BUILD=1: not building the native kernels (trm.ops will JIT-build them on use)")
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time (pip build isolation?): installing pure Python; trm.ops "
             "will JIT-build the native kernels on first use (needs a C++ compiler and ninja then). To build "
             "them now: pip install torch 'setuptools>=77' wheel ninja pybind11 && "
             "pip install --no-build-isolation -e .")
        return {}
    cfg = _load_build_config()
    home, why_not = cfg.cuda_toolkit()
    with_cuda = home is not None
    sources = cfg.cpu_sources()
    extra = {"cxx": list(cfg.CXX_FLAGS) + cfg.isystem_flags()}
    arch_list = ""
    if with_cuda:
        arch_flags, arch_list = cfg.cuda_arch_flags(ahead_of_time=True)
        sources += cfg.cuda_sources()
        extra["nvcc"] = list(cfg.NVCC_FLAGS) + arch_flags + cfg.isystem_flags()
        _say(f"building trm._C: CPU + CUDA kernels (CUDA_HOME={home}, TORCH_CUDA_ARCH_LIST={arch_list})")
    else:
        _say(f"building trm._C: CPU kernels only ({why_not})")
    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    sources = [os.path.relpath(src, ROOT) for src in sources]  # setuptools wants paths relative to setup.py
    ext = ext_cls("trm._C", sources, extra_compile_args=extra, define_macros=cfg.macros(with_cuda, arch_list))

    class TimedBuildExtension(cpp_extension.BuildExtension):
        def run(self):
            t0 = time.perf_counter()
            super().run()
            _say(f"trm._C built in {time.perf_counter() - t0:.0f} s")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": TimedBuildExtension.with_options(use_ninja=True)}}


setup(**native_build())

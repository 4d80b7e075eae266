"""Build configuration of trm's native extension, shared by ``setup.py`` (ahead of time, the
module ``trm._C``) and ``trm/ops/native.py`` (JIT, when ``trm._C`` is absent). Plain Python and
``torch.utils.cpp_extension`` only; importing it builds nothing.

Sources:
  csrc/trm_ops.cpp        the one ``TORCH_LIBRARY(trm, m)``: every schema (+ ``PyInit__C``)
  csrc/cpu/*.cpp          ``TORCH_LIBRARY_IMPL(trm, CPU, m)``: always built
  csrc/cuda/*.cu, *.cpp   kernels + ``TORCH_LIBRARY_IMPL(trm, CUDA, m)``: when a CUDA toolkit is found

Environment:
  TRM_SKIP_NATIVE_BUILD=1   setup.py builds nothing (pure-Python install; trm.ops JIT-builds on use)
  TRM_SKIP_CUDA_BUILD=1     CPU kernels only
  CUDA_HOME                 the toolkit (else torch's guess: nvcc on PATH, /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST      ahead of time: default ``8.0;9.0+PTX`` (A100, H100/H200 native code,
                            PTX that newer GPUs JIT); JIT: default = the visible GPUs
Headers of the CUDA libraries that pip's ``nvidia-*`` wheels ship (``site-packages/nvidia/*/include``)
are added with ``-isystem`` (after the toolkit's own), for toolkits that lack them.

Check: ``python csrc/build_config.py`` prints what a build here would use.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

CSRC = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
CXX_FLAGS = ["-O3", "-g0"]  # -g0: Python's own CFLAGS carry -g (slow to build, 10x larger .so)
NVCC_FLAGS = ["-O3", "-lineinfo"]


def cpu_sources() -> list[str]:
    return [str(CSRC / "trm_ops.cpp")] + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))


def cuda_sources() -> list[str]:
    return sorted(glob.glob(str(CSRC / "cuda" / "*.cu"))) + sorted(glob.glob(str(CSRC / "cuda" / "*.cpp")))


def all_source_files() -> list[str]:
    """Every file whose change calls for a rebuild (sources and headers)."""
    pats = ("*.cpp", "*.h", "*.cu", "*.cuh")
    return sorted(f for d in (CSRC, CSRC / "cpu", CSRC / "cuda") for p in pats for f in glob.glob(str(d / p)))


def nvidia_include_dirs() -> list[str]:
    """``site-packages/nvidia/*/include`` of the pip CUDA wheels torch depends on (may be empty)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs: list[str] = []
    for root in getattr(nvidia, "__path__", []):
        dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
        os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))


def cuda_toolkit() -> tuple[str | None, str | None]:
    """``(CUDA_HOME, None)`` when a toolkit (nvcc + headers) is found, else ``(None, reason)``.

    An explicit ``CUDA_HOME``/``CUDA_PATH`` wins; otherwise torch's guess, then ``/usr/local/cuda``
    (torch derives the home from ``nvcc`` on PATH, which a wrapper script in ``/usr/local/bin``
    turns into ``/usr/local``: no headers there). The choice is written back to
    ``torch.utils.cpp_extension.CUDA_HOME`` so that the build uses it.
    """
    if os.environ.get("TRM_SKIP_CUDA_BUILD") == "1":
        return None, "TRM_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return None, f"torch is not importable: {exc}"
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [explicit] if explicit else [cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    home = next((c for c in candidates if _is_toolkit(c)), None)
    if home is None:
        tried = ", ".join(str(c) for c in candidates if c) or "none"
        return None, (f"no CUDA toolkit (bin/nvcc + include/cuda_runtime_api.h) found (tried: {tried}); "
                      f"set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda")
    if torch.version.cuda is None:
        return None, f"this torch ({torch.__version__}) is a CPU-only build"
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    return home, None


def cuda_arch_flags(ahead_of_time: bool) -> tuple[list[str], str]:
    """Explicit ``-gencode`` flags and the arch list they come from.

    Ahead of time: ``TORCH_CUDA_ARCH_LIST`` or :data:`DEFAULT_CUDA_ARCH_LIST`. JIT: the env var or
    torch's choice for the visible GPUs. Passing the flags explicitly keeps torch from guessing.
    """
    from torch.utils import cpp_extension

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or (DEFAULT_CUDA_ARCH_LIST if ahead_of_time else "")
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        if arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        flags = cpp_extension._get_cuda_arch_flags()
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    if not arch_list:
        arch_list = ";".join(sorted({f.split("code=")[1] for f in flags}))
    return flags, arch_list


def macros(with_cuda: bool, arch_list: str) -> list[tuple[str, str]]:
    """Build facts compiled into ``trm._C`` (``with_cuda``, ``cuda_archs``): no shell-special characters."""
    token = arch_list.replace(";", "_").replace(" ", "_") if with_cuda else "none"
    return [("TRM_WITH_CUDA", "1" if with_cuda else "0"), ("TRM_CUDA_ARCHS", token)]


def isystem_flags() -> list[str]:
    out: list[str] = []
    for d in nvidia_include_dirs():
        out += ["-isystem", d]
    return out


if __name__ == "__main__":
    home, why = cuda_toolkit()
    print("cpu sources :", *cpu_sources(), sep="\n  ")
    print("cuda sources:", *cuda_sources(), sep="\n  ")
    print("CUDA_HOME   :", home or f"none ({why})")
    print("nvidia incs :", nvidia_include_dirs())
    if home:
        print("arch flags  :", cuda_arch_flags(ahead_of_time=True))

"""Building and loading sparseopt's native C++ kernels: one shared mechanism for every ``.cpp`` source.

A source is compiled on first use with the system C++ compiler (a few seconds, no network, no dependency beyond
``c++``), cached under :func:`cache_dir` per source, compiler, flags and CPU, and loaded with ctypes, or, for a
source that uses torch's C++ API, with ``torch.ops.load_library`` (:func:`load_torch_library`: built against the
installed torch's headers and libraries, about 10 s once). Callers keep a fallback: both loaders warn once naming
the source and the cause where the build fails, and ``SPARSEOPT_NATIVE_KERNELS=0`` chooses the fallbacks without
building.

Layout: the sources live next to the code they serve. ``sparseopt/execution/sparse_kernels.cpp`` (the CSR
products, loaded by :mod:`sparseopt.execution.native`), ``sparseopt/native/selection_kernels.cpp`` (the one-pass
scans of a mask update, loaded by :mod:`sparseopt.native.selection`, used by :mod:`sparseopt.selection`, the
update in :mod:`sparseopt.pipeline` and the ITOP record in :mod:`sparseopt.bits`) and
``sparseopt/native/gradient_masking.cpp`` (the gradient masking as a C++ autograd hook, loaded by
:mod:`sparseopt.native.gradient_masking`, used by :mod:`sparseopt.grad_hooks`). Only the build and the cache are
shared, here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]


def enabled() -> bool:
    """False when ``SPARSEOPT_NATIVE_KERNELS=0`` asks for the torch paths."""
    return os.environ.get("SPARSEOPT_NATIVE_KERNELS", "1") != "0"


def cache_dir() -> Path:
    """``$SPARSEOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparseopt``, else ``~/.cache/sparseopt``."""
    if os.environ.get("SPARSEOPT_CACHE_DIR"):
        return Path(os.environ["SPARSEOPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparseopt"


def load(source: Path, signatures: Mapping[str, tuple[Sequence, object]], fallback: str,
         extra_flags: Sequence[str] = ()) -> ctypes.CDLL | None:
    """``source`` built and loaded, its functions typed by ``signatures`` (name -> (argtypes, restype)); None
    when disabled, or when the build fails: then one RuntimeWarning names the source, the cause and ``fallback``
    (what runs instead)."""
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(build(source, extra_flags)))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"sparseopt: could not build the native {source.stem.replace('_', ' ')} ({source.name}): "
                      f"{err}; {fallback}", RuntimeWarning, stacklevel=3)
        return None
    for name, (argtypes, restype) in signatures.items():
        getattr(lib, name).argtypes = list(argtypes)
        getattr(lib, name).restype = restype
    return lib


def load_torch_library(source: Path, fallback: str) -> bool:
    """Whether ``source``, a torch C++ extension that registers its operators and classes with ``TORCH_LIBRARY``,
    is built and loaded into ``torch.ops``/``torch.classes``; False when disabled, or when the build or the load
    fails: then one RuntimeWarning names the source, the cause and ``fallback``."""
    if not enabled():
        return False
    import torch

    try:
        torch.ops.load_library(str(build(source, _torch_flags())))
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        warnings.warn(f"sparseopt: could not build the native {source.stem.replace('_', ' ')} ({source.name}): "
                      f"{err}; {fallback}", RuntimeWarning, stacklevel=3)
        return False
    return True


def _torch_flags() -> list[str]:
    """Compiler and linker flags for code against the installed torch (its headers, ABI and libraries; the version
    is in the flags so that the cache keeps one build per torch)."""
    import torch

    root = Path(torch.__file__).resolve().parent
    lib = root / "lib"
    return ["-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DSPARSEOPT_TORCH_VERSION={torch.__version__}", f"-I{root / 'include'}",
            f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", f"-L{lib}", f"-Wl,-rpath,{lib}",
            "-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10"]


def build(source: Path, extra_flags: Sequence[str] = ()) -> Path:
    """The shared library of ``source``, compiled unless the cache has it (built aside, then renamed into place,
    so concurrent first uses do not see half a file)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++ or g++ on PATH, or $CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, " ".join(flags), platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        run = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True,
                             timeout=300)
        if run.returncode != 0:
            raise OSError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags: ``-march=native`` code is only reused on a CPU that has the same ones."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                    platform.processor())
    except OSError:
        return platform.processor()

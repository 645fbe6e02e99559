"""Build the C++ consumer into build/cpp, again only when its sources or torch change.

    python cpp/build.py            # CPU only, into build/cpp; prints the path of the replay program
    python cpp/build.py --cuda     # with the CUDA path (SOA_WITH_CUDA=ON), into build/cpp-cuda

Runs cpp/setup.sh (system packages, installed when missing), then CMake against the torch
wheel of the Python running this script. The build directory is keyed by a hash of the
sources, the torch directory and version: an unchanged tree is not even re-configured. The
two variants have their own directories, so that neither rebuilds the other.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

CPP = Path(__file__).resolve().parent
ROOT = CPP.parent
BUILD = ROOT / "build" / "cpp"
BUILD_CUDA = ROOT / "build" / "cpp-cuda"
SOURCES = ("*.h", "*.cpp", "CMakeLists.txt", "cmake/*.cmake")


class MissingDependencies(RuntimeError):
    """The system packages are missing and cannot be installed here (not root, no apt), or the
    CUDA variant was asked for where there is no CUDA toolkit or the torch wheel has no CUDA."""


def torch_dir() -> Path:
    """The torch package directory of this Python (headers in include/, libraries in lib/),
    found without importing torch (seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{sys.executable} has no torch")
    return Path(spec.origin).resolve().parent


def cuda_toolkit() -> Path | None:
    """The ``nvcc`` that CMake's ``find_package(CUDAToolkit)`` finds first, or None: the one
    under ``$CUDAToolkit_ROOT``, else on the PATH, else under /usr/local/cuda."""
    root = os.environ.get("CUDAToolkit_ROOT")  # noqa: SIM112 (CMake spells it so)
    candidates = [Path(root) / "bin" / "nvcc"] if root else []
    on_path = shutil.which("nvcc")
    candidates += [Path(on_path)] if on_path else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def torch_has_cuda(torch_path: Path) -> bool:
    """Whether the torch wheel holds its CUDA libraries (a CUDA build), without importing it."""
    return all((torch_path / "lib" / f"lib{n}.so").is_file() for n in ("c10_cuda", "torch_cuda"))


def source_hash(torch_path: Path) -> str:
    """Hash of everything the build depends on that a rebuild should follow."""
    version = importlib.metadata.version("torch")
    h = hashlib.sha256(f"{torch_path}\0{version}\0".encode())
    for path in sorted(p for pattern in SOURCES for p in CPP.glob(pattern)):
        h.update(f"{path.relative_to(CPP)}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build(build_dir: Path | None = None, verbose: bool = False, cuda: bool = False) -> Path:
    """Build (or reuse) the consumer; return the path of the ``replay`` program.

    ``cuda``: build the CUDA path too (``-DSOA_WITH_CUDA=ON``, in build/cpp-cuda by default);
    otherwise the CPU-only library (``OFF``, build/cpp). Raises ``MissingDependencies`` when
    the system packages, or for ``cuda`` the CUDA toolkit or a CUDA torch wheel, are missing."""
    tdir = torch_dir()
    if cuda and cuda_toolkit() is None:
        raise MissingDependencies(
            "no CUDA toolkit here (nvcc under $CUDAToolkit_ROOT, on the PATH or under "
            "/usr/local/cuda): the CUDA variant needs its runtime headers and libcudart"
        )
    if cuda and not torch_has_cuda(tdir):
        raise MissingDependencies(f"the torch wheel in {tdir} has no CUDA libraries")
    build_dir = build_dir or (BUILD_CUDA if cuda else BUILD)
    setup = subprocess.run(["sh", str(CPP / "setup.sh")], capture_output=True, text=True)
    if setup.returncode == 3:
        raise MissingDependencies(setup.stderr.strip())
    if setup.returncode != 0:
        raise RuntimeError(f"cpp/setup.sh failed:\n{setup.stderr}")

    build_dir.mkdir(parents=True, exist_ok=True)
    replay = build_dir / "replay"
    stamp = build_dir / ".source-sha256"
    key = source_hash(tdir) + ("-cuda" if cuda else "-cpu")
    out = None if verbose else subprocess.DEVNULL
    # One build at a time per build directory (parallel test sessions share it).
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if replay.is_file() and stamp.is_file() and stamp.read_text() == key:
            return replay
        stamp.unlink(missing_ok=True)
        cache = build_dir / "CMakeCache.txt"
        if cache.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={CPP}\n" not in cache.read_text():
            cache.unlink()  # configured from another checkout: CMake would refuse to reuse it
        steps = [
            [
                "cmake",
                "-S",
                str(CPP),
                "-B",
                str(build_dir),
                f"-DTORCH_DIR={tdir}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DSOA_WITH_CUDA={'ON' if cuda else 'OFF'}",
            ],
            ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)],
        ]
        for cmd in steps:
            run = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-4000:]}")
        stamp.write_text(key)
    return replay


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="build the CUDA path too")
    try:
        print(build(verbose=True, cuda=parser.parse_args().cuda))
    except MissingDependencies as err:
        sys.exit(str(err))

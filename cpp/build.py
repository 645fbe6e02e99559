"""Build the C++ consumer into build/cpp, again only when its sources or torch change.

    python cpp/build.py            # prints the path of the replay program

Runs cpp/setup.sh (system packages, installed when missing), then CMake against the torch
wheel of the Python running this script. The build directory is keyed by a hash of the
sources, the torch directory and version: an unchanged tree is not even re-configured.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

CPP = Path(__file__).resolve().parent
ROOT = CPP.parent
BUILD = ROOT / "build" / "cpp"
SOURCES = ("*.h", "*.cpp", "CMakeLists.txt", "cmake/*.cmake")


class MissingDependencies(RuntimeError):
    """The system packages are missing and cannot be installed here (not root, no apt)."""


def torch_dir() -> Path:
    """The torch package directory of this Python (headers in include/, libraries in lib/),
    found without importing torch (seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{sys.executable} has no torch")
    return Path(spec.origin).resolve().parent


def source_hash(torch_path: Path) -> str:
    """Hash of everything the build depends on that a rebuild should follow."""
    version = importlib.metadata.version("torch")
    h = hashlib.sha256(f"{torch_path}\0{version}\0".encode())
    for path in sorted(p for pattern in SOURCES for p in CPP.glob(pattern)):
        h.update(f"{path.relative_to(CPP)}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build(build_dir: Path = BUILD, verbose: bool = False) -> Path:
    """Build (or reuse) the consumer; return the path of the ``replay`` program."""
    setup = subprocess.run(["sh", str(CPP / "setup.sh")], capture_output=True, text=True)
    if setup.returncode == 3:
        raise MissingDependencies(setup.stderr.strip())
    if setup.returncode != 0:
        raise RuntimeError(f"cpp/setup.sh failed:\n{setup.stderr}")

    build_dir.mkdir(parents=True, exist_ok=True)
    replay = build_dir / "replay"
    stamp = build_dir / ".source-sha256"
    tdir = torch_dir()
    key = source_hash(tdir)
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
    try:
        print(build(verbose=True))
    except MissingDependencies as err:
        sys.exit(str(err))

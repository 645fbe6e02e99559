"""The C++ consumer (cpp/): libtorch with no Python in the process replays the golden set.

The consumer is built once per source change into build/cpp (cpp/build.py; about a minute on
two cores the first time, instant after). Each export's golden set is unpacked to raw arrays
(cpp/unpack_golden.py) and replayed through TorchScript and AOTInductor, at batch 1 and at the
full golden batch, and by four threads sharing each loaded model. Where a CUDA toolkit is
installed, the CUDA variant (build/cpp-cuda) is built too and checked without a GPU; its GPU
replay is tests/test_gpu.py's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CPP = Path(__file__).resolve().parents[1] / "cpp"
FORMATS = ("torchscript", "aoti")
THREADS = 4


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cpp_{name}", CPP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpp_build = _load("build")
unpack_golden = _load("unpack_golden")


@pytest.fixture(scope="session")
def replay_bin() -> Path:
    """The built replay program; system packages are installed (once) if missing."""
    try:
        return cpp_build.build()
    except cpp_build.MissingDependencies as err:
        pytest.skip(f"C++ consumer not buildable here: {err}")


@pytest.fixture(scope="session")
def replay_cuda_bin() -> Path:
    """The replay program built with the CUDA path (``SOA_WITH_CUDA=ON``, build/cpp-cuda),
    where a CUDA toolkit is installed and the torch wheel is a CUDA build."""
    try:
        return cpp_build.build(cuda=True)
    except cpp_build.MissingDependencies as err:
        pytest.skip(f"CUDA variant of the C++ consumer not buildable here: {err}")


def _replay(
    binary: Path, export_dir: Path, golden_dir: Path, *args: str, env: dict | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), str(export_dir), str(golden_dir), "--min-time", "0.1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="session")
def replayed(replay_bin, exported, tmp_path_factory):
    """``replayed(model) -> (export_dir, completed replay)``, both formats, 4 threads; once."""
    cache: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(model: str):
        if model not in cache:
            export_dir = exported(model)
            golden = unpack_golden.unpack(export_dir, tmp_path_factory.mktemp(f"golden-{model}"))
            run = _replay(replay_bin, export_dir, golden, "--threads", str(THREADS))
            print(run.stdout, run.stderr)
            cache[model] = (export_dir, run)
        return cache[model]

    return get


LINE = re.compile(
    r"\[(?P<fmt>\w+)\] batch=(?P<batch>\d+)\s+max\|diff\|=(?P<diff>\S+) (?P<verdict>PASS|FAIL) "
    r"latency=(?P<us>\S+) us/call"
)


@pytest.mark.parametrize("model", ["mlp", "deepsets"])
def test_cpp_replays_golden_set(replayed, model: str) -> None:
    export_dir, run = replayed(model)
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = json.loads((export_dir / "manifest.json").read_text())
    rows = manifest["golden"]["rows"]
    tolerance = {a["format"]: a["parity"][0]["tolerance"] for a in manifest["artifacts"]}
    results = {(m["fmt"], int(m["batch"])): m for m in LINE.finditer(run.stdout)}
    assert set(results) == {(f, b) for f in FORMATS for b in (1, rows)}, run.stdout
    expected = np.load(export_dir / "golden.npz")
    scale = max(np.abs(expected[o]).max() for o in manifest["contract"]["outputs"])
    for (fmt, _), m in results.items():
        assert m["verdict"] == "PASS"
        # The rule is |diff| <= abs + rel * |expected| per value, so this bounds the maximum.
        assert float(m["diff"]) <= tolerance[fmt]["abs"] + tolerance[fmt]["rel"] * scale, m[0]
        assert float(m["us"]) > 0
    assert "RESULT PASS" in run.stdout


SOA = re.compile(
    r"\[(?P<fmt>\w+)\] soa batch=(?P<batch>\d+)\s+raw=(?P<raw>\S+) full=(?P<full>\S+) us/call "
    r"added=(?P<added>\S+) us \((?P<pct>\S+)%\)"
)


def test_cpp_measures_what_the_soa_layer_adds(replayed) -> None:
    """The replay reports run(view) against the graph on ready tensors at batch 1, the golden
    batch and 1024 rows (golden rows repeated); the figures are the benchmark's, not asserted
    here beyond being measurements."""
    export_dir, run = replayed("deepsets")
    rows = json.loads((export_dir / "manifest.json").read_text())["golden"]["rows"]
    found = {(m["fmt"], int(m["batch"])): m for m in SOA.finditer(run.stdout)}
    assert set(found) == {(f, b) for f in FORMATS for b in (1, rows, 1024)}, run.stdout
    half = 0.05  # every figure is printed to one decimal
    for m in found.values():
        raw, full, added = float(m["raw"]), float(m["full"]), float(m["added"])
        assert raw > 0
        assert full > 0
        assert added >= full - raw - 3 * half  # the larger of the two estimates
        # The percentage is of the unrounded figures; from the printed ones it is known to
        # within their rounding.
        slack = 100 * (half / raw + (abs(added) + half) * half / (raw * (raw - half))) + half
        assert abs(float(m["pct"]) - 100 * added / raw) <= slack + 1e-9, m[0]


@pytest.mark.parametrize("model", ["mlp", "deepsets"])
def test_cpp_inputs_are_the_soa_buffers(replayed, model: str) -> None:
    export_dir, run = replayed(model)
    n_inputs = len(json.loads((export_dir / "manifest.json").read_text())["inputs"])
    for fmt in FORMATS:
        assert f"[{fmt}] zero-copy: {n_inputs}/{n_inputs} inputs" in run.stdout, run.stdout


@pytest.mark.parametrize("model", ["mlp", "deepsets"])
def test_cpp_threads_sharing_a_model_match_one_thread(replayed, model: str) -> None:
    _, run = replayed(model)
    for fmt in FORMATS:
        line = next(ln for ln in run.stdout.splitlines() if ln.startswith(f"[{fmt}] threads="))
        assert f"threads={THREADS} " in line
        assert "intra-op threads per caller=1 " in line, line
        assert line.endswith("identical to one thread: yes"), line


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_refuses_artifact_with_wrong_sha256(replay_bin, exported, tmp_path, fmt) -> None:
    export_dir = shutil.copytree(exported("mlp"), tmp_path / "export")
    artifact = next(
        a["file"]
        for a in json.loads((export_dir / "manifest.json").read_text())["artifacts"]
        if a["format"] == fmt
    )
    with open(export_dir / artifact, "ab") as f:
        f.write(b"\0")
    golden = unpack_golden.unpack(export_dir, tmp_path / "golden")
    run = _replay(replay_bin, export_dir, golden, "--format", fmt)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "sha256 mismatch" in run.stderr
    assert artifact in run.stderr


def test_cpp_fails_on_outputs_beyond_tolerance(replay_bin, exported, tmp_path) -> None:
    export_dir = exported("mlp")
    golden = unpack_golden.unpack(export_dir, tmp_path / "golden")
    output = json.loads((export_dir / "manifest.json").read_text())["outputs"][0]["name"]
    expected = np.fromfile(golden / f"{output}.bin", dtype="<f4")
    expected[3] += 1e-3  # ten times the AOTInductor tolerance, a hundred times TorchScript's
    expected.tofile(golden / f"{output}.bin")
    run = _replay(replay_bin, export_dir, golden)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.count("FAIL") == 2 * len(FORMATS) + 1  # both batches per format, RESULT


VIEW = re.compile(
    r"\[(?P<fmt>\w+)\] view rows=(?P<first>\d+)\.\.(?P<last>\d+) offsets from (?P<k>\d+) "
    r"max\|diff\|=(?P<diff>\S+) (?P<verdict>PASS|FAIL)"
)


@pytest.mark.parametrize("model", ["mlp", "deepsets"])
def test_cpp_sub_range_view_gives_the_rows_outputs(replayed, model: str) -> None:
    """soa::SoAView takes a framework's view of a sub-range: offsets from row k (not 0) into
    the whole field arrays; the outputs are those rows' golden outputs."""
    export_dir, run = replayed(model)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    found = {m["fmt"]: m for m in VIEW.finditer(run.stdout)}
    assert set(found) == set(FORMATS), run.stdout
    offsets = np.load(export_dir / "golden.npz")["part_offsets"]
    for fmt, m in found.items():
        first = int(m["first"])
        assert first > 0
        assert int(m["k"]) == offsets[first] > 0
        assert m["verdict"] == "PASS"
        tol = manifest["tolerance"][fmt]
        assert float(m["diff"]) <= tol["abs"] + tol["rel"], m[0]


@pytest.mark.parametrize("model", ["mlp", "deepsets"])
def test_cpp_refuses_inconsistent_offsets(replayed, model: str) -> None:
    _, run = replayed(model)
    for fmt in FORMATS:
        assert f"[{fmt}] inconsistent offsets refused: 3/3" in run.stdout, run.stdout
        refused = [ln for ln in run.stdout.splitlines() if ln.startswith(f"[{fmt}] refused: ")]
        assert any("start at -" in ln and "must be >= 0" in ln for ln in refused), refused
        assert any("decrease at row" in ln for ln in refused), refused
        assert any("values, but the offsets of 'part' end at" in ln for ln in refused), refused


def test_cpp_cpu_build_refuses_cuda(replay_bin, exported, tmp_path) -> None:
    """The CPU-only build says that it has no CUDA path and how to build one, exit status 2."""
    export_dir = exported("mlp")
    golden = unpack_golden.unpack(export_dir, tmp_path / "golden")
    run = _replay(replay_bin, export_dir, golden, "--device", "cuda")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "built without CUDA" in run.stderr
    assert "-DSOA_WITH_CUDA=ON" in run.stderr


def test_cpp_cuda_build_runs_on_the_cpu_and_refuses_cuda_without_a_gpu(
    replay_cuda_bin, exported, tmp_path
) -> None:
    """The CUDA variant replays the CPU artifacts as the CPU build does. With no GPU visible
    (``CUDA_VISIBLE_DEVICES`` empty, so on a GPU machine too), ``--device cuda`` exits with
    status 2 and the CUDA runtime's reason, before loading anything: not a crash."""
    export_dir = exported("mlp")
    golden = unpack_golden.unpack(export_dir, tmp_path / "golden")
    n_inputs = len(json.loads((export_dir / "manifest.json").read_text())["inputs"])
    on_cpu = _replay(replay_cuda_bin, export_dir, golden)
    assert on_cpu.returncode == 0, on_cpu.stdout + on_cpu.stderr
    for fmt in FORMATS:
        assert f"[{fmt}] zero-copy: {n_inputs}/{n_inputs} inputs" in on_cpu.stdout
    assert "RESULT PASS" in on_cpu.stdout

    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for device, named in (("cuda", "cuda:0"), ("cuda:1", "cuda:1")):
        run = _replay(replay_cuda_bin, export_dir, golden, "--device", device, env=no_gpu)
        assert run.returncode == 2, run.stdout + run.stderr
        reason = f"error: device {named}: no CUDA device is usable here (cudaGetDeviceCount: "
        assert reason in run.stderr, run.stderr
        assert "loaded" not in run.stdout
    bad = _replay(replay_cuda_bin, export_dir, golden, "--device", "gpu")
    assert bad.returncode == 2
    assert "usage: replay" in bad.stderr

"""SOFIE as a consumer of an export: the ONNX graph to standalone C++, compiled and replayed.

SOFIE (PyPI ``sofie``, ROOT/TMVA's ONNX-to-C++ code generator) turns an ONNX file into one
header with a ``Session`` class and a weights file; HEP code compiles them in, with BLAS and no
runtime library. This module feeds it the export's ``model.onnx`` and checks what comes out:

- ``sofie_onnx``: the export's graph in the form SOFIE follows (``SOFIE_BATCH`` rows a call);
- ``generate``: header, weights and a replay program for an export directory;
- ``build``: the program compiled with g++ against OpenBLAS;
- ``replay``: the golden set through the compiled program, in calls of ``batch`` rows, each
  call a view of the whole set (offsets starting at the call's first row, the full field
  arrays), compared with the expected outputs under the manifest's ONNX tolerance.

Why this form. SOFIE 0.1 infers shapes symbolically, and three of its defects stop it on, or
make it wrong for, the export's graph (the smallest models in ``tests/test_sofie.py``):

- a Reshape with ``-1`` of a tensor whose symbolic length has more than one integer factor
  (``(batch, 2, 3) -> (-1, 3)``) fails in ``generate()`` with ``ValueError: stoi``
  (``ROperator_Reshape::DoShapeInference`` calls ``std::stoi`` on the whole length where it
  means the token); the assembler's padding gather and the transformer's attention reshape so;
- an Expand of an initializer changes that initializer's shape for its other users, so a later
  Add of the same constant fails to broadcast (the ONNX exporter shares scalar constants);
- a MatMul followed by an Add of a tensor that broadcasts over the batch dimensions (the
  transformer's attention mask, ``(batch, 1, 1, keys)``) is fused into one Gemm whose bias is
  broadcast wrongly: the code compiles and returns wrong scores.

With ``batch`` and ``batch_plus_1`` fixed, every length is an integer and the first defect is
not reached; giving each Expand its own copy of a shared constant avoids the second, and an
Identity between such a MatMul and Add the third. The field
arrays' length (``n_<collection>``) stays dynamic, so any number of objects fits a call. A
caller with fewer rows pads the call: flat columns with any finite value, offsets with their
last value repeated (rows with no objects), and ignores the padding rows' outputs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from project.contract import BATCH_DIM, OFFSETS_DIM

SOFIE_BATCH = 64  # rows a call of the generated code; the golden set (256 rows) is four calls


class SofieError(RuntimeError):
    """SOFIE could not generate, or g++ could not compile, the code of an export."""


def sofie_onnx(model_bytes: bytes, batch: int = SOFIE_BATCH) -> bytes:
    """The export's ONNX model with ``batch`` fixed, shapes inferred and each Expand reading its
    own copy of a shared constant (see the module docstring).

    Parameters
    ----------
    model_bytes
        ``model.onnx`` of an export (inputs ``(batch,)``, offsets ``(batch_plus_1,)``, fields
        ``(n_<collection>,)``).
    batch
        Rows per call of the generated code.
    """
    import onnx
    from onnx.tools import update_model_dims

    model = onnx.load_from_string(model_bytes)
    fixed = {BATCH_DIM: batch, OFFSETS_DIM: batch + 1}
    inputs = {
        v.name: [fixed.get(d.dim_param, d.dim_param or d.dim_value)
                 for d in v.type.tensor_type.shape.dim]
        for v in model.graph.input
    }  # fmt: skip
    outputs = {
        v.name: [fixed.get(d.dim_param, d.dim_param or d.dim_value)
                 for d in v.type.tensor_type.shape.dim]
        for v in model.graph.output
    }  # fmt: skip
    del model.graph.value_info[:]  # inferred again below, with the fixed batch
    model = update_model_dims.update_inputs_outputs_dims(model, inputs, outputs)
    _unshare_expand_inputs(model.graph)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    _separate_matmul_from_broadcast_add(model.graph)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _unshare_expand_inputs(graph: object) -> None:
    """Give every Expand of an initializer that other nodes read too its own copy of it."""
    import onnx

    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for node in graph.node:
        source = node.input[0] if node.op_type == "Expand" else None
        if source in initializers and readers[source] > 1:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[source])
            copy.name = f"{node.output[0]}_expanded_constant"
            graph.initializer.append(copy)
            node.input[0] = copy.name


def _separate_matmul_from_broadcast_add(graph: object) -> None:
    """Put an Identity between a MatMul and an Add that broadcasts a tensor of rank >= 2 onto
    its result (the attention mask onto the attention scores): SOFIE fuses the pair into one
    Gemm and broadcasts such a bias wrongly. A bias vector (a Linear layer) stays fused."""
    from onnx import helper

    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.input, *graph.value_info, *graph.output]
    }
    ranks.update({t.name: len(t.dims) for t in graph.initializer})
    shapes = {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.value_info, *graph.output]
    }
    matmul_outputs = {n.output[0] for n in graph.node if n.op_type == "MatMul"}
    nodes = []
    for node in graph.node:
        if node.op_type == "Add":
            for i, name in enumerate(node.input):
                other = node.input[1 - i]
                if (
                    name in matmul_outputs
                    and ranks.get(other, 0) >= 2
                    and shapes.get(other) != shapes.get(name)
                ):
                    separated = f"{name}_before_{node.output[0]}"
                    nodes.append(helper.make_node("Identity", [name], [separated]))
                    node.input[i] = separated
                    break
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


@dataclass(frozen=True)
class SofieCode:
    """What ``generate`` wrote: the header and weights SOFIE made, and the replay program."""

    directory: Path
    header: Path
    weights: Path
    program_source: Path
    namespace: str
    batch: int


def generate(export_dir: str | Path, out_dir: str | Path, batch: int = SOFIE_BATCH) -> SofieCode:
    """SOFIE's C++ for an export's ONNX model, and a program that replays raw inputs with it.

    Writes ``<out_dir>/<name>.onnx`` (the form of ``sofie_onnx``), ``<name>.hxx`` and
    ``<name>.dat`` (SOFIE's header and weights) and ``replay_<name>.cpp``. The model's file is
    checked against the manifest's sha256 first.
    """
    import sofie

    from project.utils import sha256_file

    export_dir, out = Path(export_dir), Path(out_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    onnx_entry = next(
        (a for a in manifest["artifacts"] if a["format"] == "onnx" and a["device"] == "cpu"), None
    )
    if onnx_entry is None:
        raise SofieError(f"{export_dir} has no ONNX artifact; export it with formats=[...,onnx]")
    onnx_path = export_dir / onnx_entry["file"]
    if sha256_file(onnx_path) != onnx_entry["sha256"]:
        raise SofieError(f"{onnx_path}: sha256 differs from the manifest's; export it again")
    # The generated namespace and file names come from the model's file name.
    name = re.sub(r"\W", "_", manifest["name"])
    name = name if name[0].isalpha() else f"m_{name}"
    out.mkdir(parents=True, exist_ok=True)
    variant = out / f"{name}.onnx"
    variant.write_bytes(sofie_onnx(onnx_path.read_bytes(), batch))
    try:
        rmodel = sofie.onnx.parse(str(variant))
        rmodel.generate()
        rmodel.output_generated(str(out / f"{name}.hxx"))
    except (RuntimeError, ValueError) as err:
        raise SofieError(f"SOFIE could not generate code for {variant}: {err}") from err
    source = out / f"replay_{name}.cpp"
    source.write_text(replay_source(manifest, name, batch))
    return SofieCode(out, out / f"{name}.hxx", out / f"{name}.dat", source, f"SOFIE_{name}", batch)


def replay_source(manifest: dict, name: str, batch: int) -> str:
    """C++ of a program that runs ``<name>.hxx`` over raw inputs in calls of ``batch`` rows.

    ``replay_<name> WEIGHTS IN_DIR OUT_DIR ROWS`` reads ``IN_DIR/<input>.bin`` (raw
    little-endian, as ``cpp/unpack_golden.py`` writes them), runs every call on a view of the
    whole arrays (each collection's offsets from the call's first row, its full field arrays;
    the last call padded to ``batch`` rows) and writes ``OUT_DIR/<output>.bin`` (float32).
    """
    inputs = sorted(manifest["inputs"], key=lambda i: i["position"])
    outputs = [o["name"] for o in manifest["outputs"]]
    collections = [c["name"] for c in manifest["contract"]["jagged"]]
    args: list[str] = []
    seen: set[str] = set()
    lines = []
    for spec in inputs:
        n, dim = spec["name"], spec["shape"][0]
        if spec["dtype"] == "int64":
            lines.append(f'  const auto {n} = read<int64_t>(in / "{n}.bin");')
        else:
            lines.append(f'  const auto {n} = read<float>(in / "{n}.bin");')
        if dim == OFFSETS_DIM:
            args.append(f"offsets_view({n}, first, rows_here)")
        elif dim == BATCH_DIM:
            args.append(f"rows_view({n}, first, rows_here)")
        else:
            # SOFIE passes a dynamic length before the first tensor that has it.
            if dim not in seen:
                args.append(f"{n}.size()")
                seen.add(dim)
            args.append(f"{n}.data()")
    first_of = {}
    for spec in inputs:
        first_of.setdefault(spec["shape"][0], spec["name"])
    session_args = ", ".join(
        f"{first_of[f'n_{c}']}.size()" for c in collections if f"n_{c}" in first_of
    )
    writes = "\n".join(f'  write(out / "{o}.bin", results[{i}]);' for i, o in enumerate(outputs))
    reads = "\n".join(lines)
    call = ", ".join(args)
    return f"""// Replays raw inputs through SOFIE's code for the export {manifest["name"]!r}, {batch} rows a call.
// Generated by project.deploy.sofie_cpp; see its docstring.
#include "{name}.hxx"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {{

constexpr size_t kBatch = {batch};

template <typename T>
std::vector<T> read(const std::filesystem::path& path) {{
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error("cannot read " + path.string());
  const auto bytes = static_cast<size_t>(f.tellg());
  if (bytes % sizeof(T)) throw std::runtime_error(path.string() + ": not whole values");
  std::vector<T> v(bytes / sizeof(T));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(bytes));
  return v;
}}

void write(const std::filesystem::path& path, const std::vector<float>& v) {{
  std::ofstream f(path, std::ios::binary | std::ios::app);
  f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
}}

// The padded copies of a short call, one per input (a deque: adding one moves no other).
std::deque<std::vector<float>> pad_rows;
std::deque<std::vector<int64_t>> pad_offsets;

// Rows [first, first + rows) of a flat column: a pointer into it when the call is full,
// otherwise a copy padded with the last row to kBatch rows.
const float* rows_view(const std::vector<float>& col, size_t first, size_t rows) {{
  if (rows == kBatch) return col.data() + first;
  pad_rows.emplace_back(col.begin() + static_cast<std::ptrdiff_t>(first),
                        col.begin() + static_cast<std::ptrdiff_t>(first + rows));
  pad_rows.back().resize(kBatch, col[first + rows - 1]);
  return pad_rows.back().data();
}}

// The call's offsets: offsets[first .. first + rows], which start at offsets[first] and index
// the collection's full field arrays (a view); a short call repeats the last offset (padding
// rows without objects).
const int64_t* offsets_view(const std::vector<int64_t>& off, size_t first, size_t rows) {{
  if (rows == kBatch) return off.data() + first;
  pad_offsets.emplace_back(off.begin() + static_cast<std::ptrdiff_t>(first),
                           off.begin() + static_cast<std::ptrdiff_t>(first + rows + 1));
  pad_offsets.back().resize(kBatch + 1, off[first + rows]);
  return pad_offsets.back().data();
}}

}}  // namespace

int main(int argc, char** argv) {{
  if (argc != 5) {{
    std::fprintf(stderr, "usage: %s WEIGHTS IN_DIR OUT_DIR ROWS\\n", argv[0]);
    return 2;
  }}
  try {{
    const std::filesystem::path in = argv[2], out = argv[3];
    const size_t total = std::stoul(argv[4]);
{reads}
    SOFIE_{name}::Session session(argv[1]{", " + session_args if session_args else ""});
    for (const auto& o : {{{", ".join(f'"{o}"' for o in outputs)}}})
      std::filesystem::remove(out / (std::string(o) + ".bin"));
    size_t calls = 0;
    for (size_t first = 0; first < total; first += kBatch, ++calls) {{
      const size_t rows_here = std::min(kBatch, total - first);
      pad_rows.clear();
      pad_offsets.clear();
      auto results = session.infer({call});
      for (auto& r : results) r.resize(rows_here);
{writes}
    }}
    std::printf("%zu rows in %zu calls of %zu\\n", total, calls, kBatch);
    return 0;
  }} catch (const std::exception& e) {{
    std::fprintf(stderr, "error: %s\\n", e.what());
    return 2;
  }}
}}
"""


def build(code: SofieCode, compiler: str = "g++", opt: str = "-O1") -> Path:
    """Compile the replay program against OpenBLAS (``sgemm_``, which the header calls).

    ``-O1``: the transformer's header compiles in about half the time of ``-O2``, and the
    replay checks values, not speed.
    """
    if shutil.which(compiler) is None:
        raise SofieError(f"{compiler} not found; install a C++ compiler (apt-get install g++)")
    binary = code.directory / code.program_source.stem
    cmd = [compiler, "-std=c++17", opt, str(code.program_source), "-o", str(binary), "-lopenblas"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=code.directory)
    if run.returncode != 0:
        raise SofieError(f"{' '.join(cmd)} failed:\n{run.stderr[-4000:]}")
    return binary


def replay(
    export_dir: str | Path, code: SofieCode, binary: Path, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run the compiled program on ``inputs`` (the graph's inputs by name, as in
    ``golden.npz``); returns the outputs by name."""
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    rows = len(inputs[manifest["inputs"][0]["name"]])
    if any(i["shape"][0] == OFFSETS_DIM for i in manifest["inputs"]):
        rows = next(
            len(inputs[i["name"]]) - 1 for i in manifest["inputs"] if i["shape"][0] == OFFSETS_DIM
        )
    with tempfile.TemporaryDirectory(prefix="sofie-replay-") as tmp:
        in_dir, out_dir = Path(tmp) / "in", Path(tmp) / "out"
        in_dir.mkdir()
        out_dir.mkdir()
        for spec in manifest["inputs"]:
            dtype = "<i8" if spec["dtype"] == "int64" else "<f4"
            np.ascontiguousarray(inputs[spec["name"]], dtype=dtype).tofile(
                in_dir / f"{spec['name']}.bin"
            )
        run = subprocess.run(
            [str(binary), str(code.weights), str(in_dir), str(out_dir), str(rows)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if run.returncode != 0:
            raise SofieError(f"{binary.name} failed ({run.returncode}): {run.stderr.strip()}")
        return {
            o["name"]: np.fromfile(out_dir / f"{o['name']}.bin", dtype="<f4")
            for o in manifest["outputs"]
        }

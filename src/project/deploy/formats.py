"""Exporters: the deploy graph to TorchScript, AOTInductor, ONNX and the ``torch.export``
program itself, each with dynamic ``batch`` and ``n_<collection>`` dimensions that are checked
in the saved artifact.

Dimension names are plain identifiers in every format (``batch``, ``batch_plus_1``,
``n_<collection>``; an intermediate ``64*batch`` becomes ``batch_times_64``): code generators
such as SOFIE write them into C++ as variable names.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from project.contract import BATCH_DIM, OFFSETS_DIM, InputContract
from project.deploy.graph import DeployGraph


class ExportError(RuntimeError):
    """An exporter failed or produced an artifact without the promised properties."""


def dynamic_shapes(contract: InputContract) -> tuple[tuple[dict[int, Any], ...]]:
    """``torch.export`` dynamic shapes for ``DeployGraph.forward(*inputs)``."""
    batch = Dim("batch", min=1)
    totals = {c.name: Dim(f"n_{c.name}", min=0) for c in contract.jagged}
    specs: list[dict[int, Any]] = [{0: batch} for _ in contract.flat]
    for coll in contract.jagged:
        specs.append({0: batch + 1})
        specs.extend({0: totals[coll.name]} for _ in coll.fields)
    return (tuple(specs),)


def export_torchscript(graph: DeployGraph, example: tuple[torch.Tensor, ...], path: Path) -> dict:
    """Trace the graph to TorchScript.

    Tracing, not scripting, is correct here: the graph has no data-dependent control flow
    (the assembler is gathers only), shapes are recorded as ``aten::size`` operations so
    ``batch`` and ``n_total`` stay dynamic, and tracing accepts any network the template can
    train without TorchScript type annotations. A tracer warning means something was baked in
    as a constant, so warnings fail the export.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(graph, example, check_trace=True)
        except torch.jit.TracerWarning as err:
            raise ExportError(f"TorchScript tracing baked in a constant: {err}") from err
    traced = torch.jit.freeze(traced.eval()) if example[0].device.type == "cpu" else traced
    torch.jit.save(traced, str(path))
    return {"method": "trace"}


def export_program(
    graph: DeployGraph, example: tuple[torch.Tensor, ...], contract: InputContract
) -> torch.export.ExportedProgram:
    """``torch.export`` the graph with symbolic ``batch`` and ``n_<collection>`` dimensions."""
    program = torch.export.export(
        graph, example, dynamic_shapes=dynamic_shapes(contract), strict=False
    )
    check_program_dims(program, contract)
    return program


def save_program(
    graph: DeployGraph, example: tuple[torch.Tensor, ...], contract: InputContract, path: Path
) -> dict:
    """Save the ``torch.export`` program (``torch.export.save``): the graph that AOTInductor
    and ONNX are lowered from, and what Model Explorer and other lowerings read."""
    program = export_program(graph, example, contract)
    torch.export.save(program, str(path))
    return {"range_constraints": program_dims(program, contract)}


def program_dims(
    program: torch.export.ExportedProgram, contract: InputContract
) -> dict[str, dict[str, str]]:
    """Each input dimension of ``contract.input_dims`` with the program's own symbol for it
    (``s77``, ``s77 + 1``: torch names them) and its range."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = list(program.graph_signature.user_inputs)
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    dims: dict[str, dict[str, str]] = {}
    for name, user_input in zip(contract.input_names, user_inputs, strict=True):
        symbol = str(placeholders[user_input].meta["val"].shape[0])
        found = ranges.get(symbol)
        dims.setdefault(
            contract.input_dims[name],
            {
                "symbol": symbol,
                "min": str(found.lower) if found is not None else "",
                "max": str(found.upper) if found is not None else "",
            },
        )
    return dims


def check_program_dims(program: torch.export.ExportedProgram, contract: InputContract) -> None:
    """Every input's first dimension must be symbolic in the exported program."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [n.meta["val"].shape for n in placeholders if n.name in user_inputs]
    for name, shape in zip(contract.input_names, shapes, strict=True):
        if isinstance(shape[0], int):
            raise ExportError(
                f"exported program: input {name!r} has a static first dimension {shape[0]}"
            )


def links_shared_libstdcxx(cxx: str) -> bool:
    """Whether the C++ compiler ``cxx`` links libstdc++ as a shared library (it finds a
    ``libstdc++.so``); a compiler that has only ``libstdc++.a`` links a private copy."""
    try:
        found = subprocess.run(
            [cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.isabs(found) and os.path.exists(found)


def aoti_compiler(requested: str = "auto") -> str:
    """The C++ compiler that builds AOTInductor packages.

    A package's ``wrapper.so`` must use the process's own libstdc++ (the shared one libtorch
    loads). A compiler that has only a static ``libstdc++.a`` puts a second copy into the
    package; with two copies in one process, ``std::regex`` in the package's device parsing
    (``torch::aot_inductor::parse_device_str``) crashes on load. This was the segfault of every
    AOTInductor package on one GPU image, whose ``CXX`` (Inductor's default compiler) was such
    a toolchain while the system ``g++`` was not. ``auto`` takes the first of ``$CXX``, ``g++``,
    ``c++`` and ``/usr/bin/g++`` that links libstdc++ as a shared library, and Inductor's own
    default if none does; any other value is used as it is.
    """
    default = os.environ.get("CXX") or "g++"
    if requested != "auto":
        return requested
    for candidate in dict.fromkeys((default, "g++", "c++", "/usr/bin/g++")):
        path = shutil.which(candidate)
        if path and links_shared_libstdcxx(path):
            return path
    return default


def export_aoti(
    program: torch.export.ExportedProgram,
    path: Path,
    device: str,
    cpp_threads: int = 1,
    *,
    contract: InputContract,
    cxx: str = "auto",
) -> dict:
    """Compile an AOTInductor package (``.pt2``) for ``device`` with ``aoti_compiler(cxx)``.

    The CPU thread count is baked into the generated code at compile time, so it is compiled
    under the single-threaded policy (``cpp.threads``); the package runs only on CPUs with the
    instruction set it was compiled for (recorded in the manifest).
    """
    import torch._inductor

    compiler = aoti_compiler(cxx)
    options: dict[str, Any] = {"cpp.cxx": (None, compiler)}
    if device == "cpu":
        options["cpp.threads"] = int(cpp_threads)
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs=options
    )
    info: dict[str, Any] = {"cpp_threads": cpp_threads if device == "cpu" else None}
    info["cxx"] = compiler
    if device == "cpu":
        info["cpu_isa"] = cpu_isa()
    else:
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    info["range_constraints"] = program_dims(program, contract)
    return info


def cpu_isa() -> str:
    """The vector instruction set Inductor generates code for on this machine."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()) or "none"
    except Exception:  # older torch layouts; the record is informative only
        return "unknown"


def export_onnx(
    graph: DeployGraph,
    example: tuple[torch.Tensor, ...],
    contract: InputContract,
    path: Path,
    opset: int = 18,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Export with the ``torch.export``-based ONNX exporter and check the saved model.

    Every dimension name is made a plain identifier (``identifier_dims``), ``metadata`` goes
    into the model's ``metadata_props`` (see ``onnx_metadata``), ``onnx.checker`` validates the
    graph, and every input and output must carry a symbolic (``dim_param``) first dimension.
    """
    import onnx

    # The exporter and its optimiser narrate every pass on stdout and at INFO level.
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        onnx_program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            dynamic_shapes=dynamic_shapes(contract),
            input_names=contract.input_names,
            output_names=list(contract.outputs),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    model = onnx_program.model_proto
    renamed = identifier_dims(model)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise ExportError(f"ONNX {value.name!r} has a static first dimension {dim.dim_value}")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {
        "opset": opsets.get("ai.onnx", opset),
        "dim_params": {
            v.name: v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input
        },
        "renamed_dims": renamed,
    }


def dim_identifier(expr: str) -> str:
    """A plain identifier for a symbolic dimension that the exporter named by an expression:
    ``batch + 1`` -> ``batch_plus_1`` (``OFFSETS_DIM``), ``n_part + 1`` -> ``n_part_plus_1``,
    ``64*batch`` -> ``batch_times_64``; an identifier is returned as it is."""
    if expr.isidentifier():
        return expr
    text = expr.replace(" ", "")
    if text == f"{BATCH_DIM}+1":
        return OFFSETS_DIM
    if match := re.fullmatch(r"(\d+)\*([A-Za-z_]\w*)", text):
        return f"{match[2]}_times_{match[1]}"
    words = {"+": "_plus_", "-": "_minus_", "*": "_times_", "//": "_floordiv_", "/": "_div_"}
    for sign, word in words.items():
        text = text.replace(sign, word)
    text = re.sub(r"\W", "_", text)
    return text if text[0].isalpha() or text[0] == "_" else f"d_{text}"


def identifier_dims(model: Any) -> dict[str, str]:
    """Rename every expression-named ``dim_param`` of an ONNX model (inputs, outputs and
    ``value_info``) to ``dim_identifier`` of it, in place; returns the renaming."""
    renamed: dict[str, str] = {}
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and not dim.dim_param.isidentifier():
                renamed[dim.dim_param] = dim.dim_param = dim_identifier(dim.dim_param)
    return renamed


def onnx_metadata(
    contract: InputContract, tolerance: dict[str, float], provenance: dict[str, Any]
) -> dict[str, str]:
    """What a consumer with only ``model.onnx`` needs (ONNX Runtime in CMSSW or Athena), as
    ``metadata_props``: text values, JSON where structured.

    ``contract`` (the whole input contract with its constants, JSON), ``inputs`` (the graph's
    inputs in call order with dtype, symbolic length and source expression, JSON),
    ``offsets_rule``, ``classes`` and ``outputs`` (JSON lists), ``tolerance`` (this format's
    parity tolerance, JSON), ``git_commit``, ``git_dirty``, ``torch``, ``onnx``,
    ``onnxruntime`` and ``python`` (the exporting environment).
    """
    from project.contract import OFFSETS_RULE

    dims, exprs, dtypes = contract.input_dims, contract.input_exprs, contract.input_dtypes
    inputs = [
        {"name": n, "position": i, "dtype": dtypes[n], "shape": [dims[n]], "expr": exprs[n]}
        for i, n in enumerate(contract.input_names)
    ]
    meta = {
        "contract": json.dumps(contract.to_dict(), sort_keys=True),
        "inputs": json.dumps(inputs),
        "offsets_rule": OFFSETS_RULE,
        "classes": json.dumps(list(contract.classes)),
        "outputs": json.dumps(
            [{"name": o, "meaning": contract.output_meaning(o)} for o in contract.outputs]
        ),
        "tolerance": json.dumps({"abs": float(tolerance["abs"]), "rel": float(tolerance["rel"])}),
    }
    for key in ("git_commit", "git_dirty", "torch", "onnx", "onnxruntime", "python"):
        value = provenance.get(key)
        meta[key] = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return meta

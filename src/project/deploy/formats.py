"""Exporters: the deploy graph to TorchScript, AOTInductor and ONNX, each with dynamic
``batch`` and ``n_total`` dimensions that are checked in the saved artifact."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from project.contract import InputContract
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


def export_aoti(
    program: torch.export.ExportedProgram, path: Path, device: str, cpp_threads: int = 1
) -> dict:
    """Compile an AOTInductor package (``.pt2``) for ``device``.

    The CPU thread count is baked into the generated code at compile time, so it is compiled
    under the single-threaded policy (``cpp.threads``); the package runs only on CPUs with the
    instruction set it was compiled for (recorded in the manifest).
    """
    import torch._inductor

    options = {"cpp.threads": int(cpp_threads)} if device == "cpu" else {}
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs=options
    )
    info: dict[str, Any] = {"cpp_threads": cpp_threads if device == "cpu" else None}
    if device == "cpu":
        info["cpu_isa"] = cpu_isa()
    else:
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    info["range_constraints"] = {
        str(k): [str(v.lower), str(v.upper)] for k, v in program.range_constraints.items()
    }
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
) -> dict:
    """Export with the ``torch.export``-based ONNX exporter and check the saved model.

    ``onnx.checker`` validates the graph; every input and output must carry a symbolic
    (``dim_param``) first dimension.
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
    onnx_program.save(str(path))
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
    }

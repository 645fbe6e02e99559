"""A Triton Inference Server model repository for an export (``triton=true``).

``<export>/triton/`` is a model repository (``tritonserver --model-repository <export>/triton``):

- ``<name>/config.pbtxt`` and ``<name>/1/model.onnx``: the ONNX Runtime backend;
- ``<name>_libtorch/config.pbtxt`` and ``<name>_libtorch/1/model.pt``: the PyTorch (libtorch)
  backend, TorchScript.

One request is one row (a jet, an event): each flat column is one value (``dims: [1]``,
reshaped to the graph's ``(batch,)``), and each field of a jagged collection is the row's
objects, declared for ragged batching (``allow_ragged_batch``). Triton's dynamic batcher
concatenates the requests' fields into the graph's ``(n_<collection>,)`` inputs and computes
the collection's offsets itself, as a batch input of kind
``BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO``: ``[0, n_1, n_1 + n_2, ...]``, exactly the
graph's offsets. Triton writes batch inputs as int32 (or float32) only, so the two models take
int32 offsets and cast them to int64 as their first step; apart from that they are the
export's graph, and both are replayed on the golden set here, under the export's tolerance,
before the repository is written. The PyTorch backend names tensors by position
(``<name>__<index>``); the ONNX backend by the graph's own names.

``check_config`` parses a ``config.pbtxt`` with Triton's own ``ModelConfig`` protobuf (from
``tritonclient``) and checks its names, data types and dims against the model file. Triton's
server itself does not run here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from project.contract import BATCH_DIM, OFFSETS_DIM, InputContract
from project.deploy.formats import ExportError, export_torchscript
from project.deploy.graph import LoadedCheckpoint

TRITON_DIR = "triton"
# Requests the dynamic batcher may put into one call (rows); the graph takes any batch size.
MAX_BATCH_SIZE = 1024
CONFIG_TYPES = {"float32": "TYPE_FP32", "int32": "TYPE_INT32", "int64": "TYPE_INT64"}
ONNX_TYPES = {"float32": 1, "int32": 6, "int64": 7}  # onnx.TensorProto element types


class Int32Offsets(nn.Module):
    """The deploy graph taking each collection's offsets as int32 (what Triton's batch inputs
    are), cast to int64 first; every other input as it is."""

    def __init__(self, graph: nn.Module, offsets_positions: list[int]) -> None:
        super().__init__()
        self.graph = graph
        self.offsets_positions = offsets_positions

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """The graph's outputs, each ``(batch,)``."""
        cast = [x.long() if i in self.offsets_positions else x for i, x in enumerate(inputs)]
        return self.graph(*cast)


def _offsets_positions(contract: InputContract) -> list[int]:
    return [contract.input_names.index(c.offsets_name) for c in contract.jagged]


def onnx_with_int32_offsets(model_bytes: bytes, contract: InputContract) -> bytes:
    """The export's ONNX model with each ``<collection>_offsets`` input int32 and a Cast to
    int64 in front of the nodes that read it."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    offsets = {c.offsets_name for c in contract.jagged}
    for value in model.graph.input:
        if value.name in offsets:
            value.type.tensor_type.elem_type = onnx.TensorProto.INT32
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in offsets:
                node.input[i] = f"{name}_int64"
    casts = [
        helper.make_node("Cast", [n], [f"{n}_int64"], to=onnx.TensorProto.INT64, name=f"{n}_cast")
        for n in contract.input_names
        if n in offsets
    ]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def config_text(
    name: str, contract: InputContract, platform: str, tensor_names: dict[str, str]
) -> str:
    """``config.pbtxt`` for one backend; ``tensor_names`` maps the graph's input and output
    names to the names the backend uses."""
    inputs, batch_inputs, outputs = [], [], []
    ragged_source: dict[str, str] = {}
    for coll in contract.jagged:
        ragged_source[coll.offsets_name] = tensor_names[coll.field_input_names[0]]
    dims, dtypes = contract.input_dims, contract.input_dtypes
    for n in contract.input_names:
        if n in ragged_source:
            batch_inputs.append(
                "  {\n    kind: BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO\n"
                f'    target_name: "{tensor_names[n]}"\n    data_type: TYPE_INT32\n'
                f'    source_input: "{ragged_source[n]}"\n  }}'
            )
        elif dims[n] == BATCH_DIM:
            inputs.append(
                f'  {{\n    name: "{tensor_names[n]}"\n    data_type: {CONFIG_TYPES[dtypes[n]]}\n'
                "    dims: [ 1 ]\n    reshape: { shape: [ ] }\n  }"
            )
        else:
            inputs.append(
                f'  {{\n    name: "{tensor_names[n]}"\n    data_type: {CONFIG_TYPES[dtypes[n]]}\n'
                "    dims: [ -1 ]\n    allow_ragged_batch: true\n  }"
            )
    for o in contract.outputs:
        outputs.append(
            f'  {{\n    name: "{tensor_names[o]}"\n    data_type: TYPE_FP32\n'
            "    dims: [ 1 ]\n    reshape: { shape: [ ] }\n  }"
        )
    # One thread per model instance: the deployment policy (the server's instances and
    # requests are the concurrency).
    threads = (
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }\n'
        if platform == "onnxruntime_onnx"
        else 'parameters { key: "INTRA_OP_THREAD_COUNT" value: { string_value: "1" } }\n'
        'parameters { key: "INTER_OP_THREAD_COUNT" value: { string_value: "1" } }\n'
    )
    parts = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {MAX_BATCH_SIZE}",
        "dynamic_batching { }",
        "input [\n" + ",\n".join(inputs) + "\n]",
    ]
    if batch_inputs:
        parts.append("batch_input [\n" + ",\n".join(batch_inputs) + "\n]")
    parts += [
        "output [\n" + ",\n".join(outputs) + "\n]",
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
        threads.rstrip("\n"),
    ]
    return "\n".join(parts) + "\n"


def libtorch_names(contract: InputContract) -> dict[str, str]:
    """The PyTorch backend's tensor names: ``<name>__<position>``."""
    names = {n: f"{n}__{i}" for i, n in enumerate(contract.input_names)}
    names.update({o: f"{o}__{i}" for i, o in enumerate(contract.outputs)})
    return names


def triton_inputs(golden: dict[str, np.ndarray], contract: InputContract) -> list[np.ndarray]:
    """The golden inputs as the Triton models take them, in graph order (offsets int32)."""
    offsets = {c.offsets_name for c in contract.jagged}
    return [
        golden[n].astype(np.int32) if n in offsets else np.ascontiguousarray(golden[n])
        for n in contract.input_names
    ]


def _max_diff(got: list[np.ndarray], expected: list[np.ndarray], tol: dict[str, float]) -> float:
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        diff = np.abs(g.astype(np.float64) - e)
        if g.shape != e.shape or not np.all(diff <= tol["abs"] + tol["rel"] * np.abs(e)):
            raise ExportError(
                f"Triton model output differs from the golden set beyond abs={tol['abs']} "
                f"rel={tol['rel']} (max |diff| {float(diff.max(initial=0.0)):.3g})"
            )
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def write_repository(
    export_dir: Path,
    name: str,
    loaded: LoadedCheckpoint,
    example: tuple[Tensor, ...],
    golden: dict[str, np.ndarray],
    tolerance: Any,
) -> dict[str, Any]:
    """Write ``export_dir/triton/`` (see the module docstring) and return its manifest entry.

    ``example`` is the export's example input (int64 offsets), ``golden`` the golden arrays by
    name; ``tolerance`` the export's per-format tolerances. Each model is replayed on the
    golden set (ONNX Runtime, TorchScript) and each config checked with ``check_config``.
    """
    import onnxruntime as ort

    from project.utils import sha256_file

    contract = loaded.contract
    onnx_file = export_dir / "model.onnx"
    if not onnx_file.is_file():
        raise ExportError("triton=true needs the ONNX artifact: add onnx to formats")
    repo = export_dir / TRITON_DIR
    expected = [golden[o] for o in contract.outputs]
    inputs = triton_inputs(golden, contract)
    models: dict[str, Any] = {}

    onnx_dir = repo / name / "1"
    onnx_dir.mkdir(parents=True)
    onnx_path = onnx_dir / "model.onnx"
    onnx_path.write_bytes(onnx_with_int32_offsets(onnx_file.read_bytes(), contract))
    (repo / name / "config.pbtxt").write_text(
        config_text(name, contract, "onnxruntime_onnx", {n: n for n in _all_names(contract)})
    )
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(list(contract.outputs), dict(zip(contract.input_names, inputs, strict=True)))
    models[name] = {
        "backend": "onnxruntime",
        "file": f"{TRITON_DIR}/{name}/1/model.onnx",
        "sha256": sha256_file(onnx_path),
        "golden_max_abs": _max_diff(got, expected, tolerance["onnx"]),
    }

    torch_name = f"{name}_libtorch"
    torch_dir = repo / torch_name / "1"
    torch_dir.mkdir(parents=True)
    torch_path = torch_dir / "model.pt"
    positions = _offsets_positions(contract)
    wrapper = Int32Offsets(loaded.graph, positions).eval()
    example32 = tuple(x.int() if i in positions else x for i, x in enumerate(example))
    export_torchscript(wrapper, example32, torch_path)
    (repo / torch_name / "config.pbtxt").write_text(
        config_text(torch_name, contract, "pytorch_libtorch", libtorch_names(contract))
    )
    module = torch.jit.load(str(torch_path))
    with torch.inference_mode():
        got = [t.numpy() for t in module(*(torch.from_numpy(a) for a in inputs))]
    models[torch_name] = {
        "backend": "pytorch",
        "file": f"{TRITON_DIR}/{torch_name}/1/model.pt",
        "sha256": sha256_file(torch_path),
        "golden_max_abs": _max_diff(got, expected, tolerance["torchscript"]),
    }
    for model_name in models:
        check_config(repo / model_name, contract)
    return {"repository": TRITON_DIR, "max_batch_size": MAX_BATCH_SIZE, "models": models}


def _all_names(contract: InputContract) -> list[str]:
    return [*contract.input_names, *contract.outputs]


def check_config(model_dir: Path, contract: InputContract) -> Any:
    """Parse ``model_dir/config.pbtxt`` with Triton's ``ModelConfig`` protobuf and check it
    against the model file in ``model_dir/1/``; return the parsed config.

    Checked: the name is the directory's; every graph input is a config input or a batch input
    (offsets: ``BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO`` of one of the collection's fields,
    int32) and nothing else is; flat columns and outputs ``dims: [1]`` reshaped to ``[]``,
    fields ``dims: [-1]`` with ``allow_ragged_batch``; data types those of the model file (ONNX)
    or of the contract (TorchScript, whose inputs are positional, ``<name>__<index>``).
    Raises ``ExportError`` naming the first mismatch.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:  # the dev extra has it
        raise ExportError(
            f"checking a Triton config needs tritonclient ({err}); pip install -e '.[dev]'"
        ) from err

    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    fail = lambda what: ExportError(f"{model_dir / 'config.pbtxt'}: {what}")  # noqa: E731
    if config.name != model_dir.name:
        raise fail(f"name {config.name!r} is not the model directory's {model_dir.name!r}")
    if config.max_batch_size < 1:
        raise fail("max_batch_size must be >= 1 for dynamic and ragged batching")
    types = {v: k for k, v in model_config_pb2.DataType.items()}
    if config.platform == "onnxruntime_onnx":
        graph_types, graph_ranks, names = _onnx_signature(model_dir / "1" / "model.onnx")
    elif config.platform == "pytorch_libtorch":
        names = libtorch_names(contract)
        module = torch.jit.load(str(model_dir / "1" / "model.pt"))
        n_args = len(module.forward.schema.arguments) - 1  # self
        if n_args != len(contract.input_names):
            raise fail(
                f"model.pt takes {n_args} inputs, the contract has {len(contract.input_names)}"
            )
        offsets = {c.offsets_name for c in contract.jagged}
        graph_types = {
            names[n]: "int32" if n in offsets else contract.input_dtypes[n]
            for n in contract.input_names
        }
        graph_types.update({names[o]: "float32" for o in contract.outputs})
        graph_ranks = dict.fromkeys(graph_types, 1)
    else:
        raise fail(f"unexpected platform {config.platform!r}")

    declared = {i.name: i for i in config.input}
    batch_inputs = {b.target_name[0]: b for b in config.batch_input}
    expected_inputs = [names[n] for n in contract.input_names]
    if sorted([*declared, *batch_inputs]) != sorted(expected_inputs):
        raise fail(
            f"inputs {sorted([*declared, *batch_inputs])} are not the graph's {sorted(expected_inputs)}"
        )
    dims = contract.input_dims
    for n in contract.input_names:
        t = names[n]
        if graph_ranks.get(t) != 1:
            raise fail(f"model input {t!r} has rank {graph_ranks.get(t)}, expected 1")
        if dims[n] == OFFSETS_DIM:
            b = batch_inputs.get(t)
            coll = next(c for c in contract.jagged if c.offsets_name == n)
            fields = {names[f] for f in coll.field_input_names}
            if b is None or types[b.data_type] != "TYPE_INT32" or graph_types[t] != "int32":
                raise fail(f"{t!r} must be an int32 batch input (and an int32 model input)")
            if model_config_pb2.BatchInput.Kind.Name(b.kind) != (
                "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO"
            ) or list(b.source_input) not in ([f] for f in fields):
                raise fail(
                    f"{t!r}: accumulated element counts with zero of one of {sorted(fields)}"
                )
            continue
        i = declared[t]
        if types[i.data_type] != CONFIG_TYPES[graph_types[t]]:
            raise fail(f"input {t!r} is {types[i.data_type]}, the model has {graph_types[t]}")
        if dims[n] == BATCH_DIM:
            if list(i.dims) != [1] or list(i.reshape.shape) != [] or not i.HasField("reshape"):
                raise fail(f"flat input {t!r} must have dims [1] reshaped to []")
        elif list(i.dims) != [-1] or not i.allow_ragged_batch:
            raise fail(f"field {t!r} must have dims [-1] and allow_ragged_batch: true")
    outputs = {o.name: o for o in config.output}
    if sorted(outputs) != sorted(names[o] for o in contract.outputs):
        raise fail(f"outputs {sorted(outputs)} are not the graph's")
    for o in contract.outputs:
        out = outputs[names[o]]
        if types[out.data_type] != CONFIG_TYPES[graph_types[names[o]]]:
            raise fail(f"output {names[o]!r} is {types[out.data_type]}")
        if list(out.dims) != [1] or not out.HasField("reshape") or list(out.reshape.shape):
            raise fail(f"output {names[o]!r} must have dims [1] reshaped to []")
    return config


def _onnx_signature(path: Path) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
    """Element types and ranks of an ONNX model's inputs and outputs, and the identity names."""
    import onnx

    model = onnx.load(str(path))
    by_code = {v: k for k, v in ONNX_TYPES.items()}
    types, ranks = {}, {}
    for value in [*model.graph.input, *model.graph.output]:
        tensor = value.type.tensor_type
        types[value.name] = by_code.get(tensor.elem_type, str(tensor.elem_type))
        ranks[value.name] = len(tensor.shape.dim)
    return types, ranks, {n: n for n in types}

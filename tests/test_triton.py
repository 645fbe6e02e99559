"""``scripts/export.py triton=true``: a Triton model repository (ONNX Runtime and libtorch),
its configs parsed with Triton's own ModelConfig protobuf and checked against the model files,
the models replayed on the golden set (and on a view). Triton's server does not run here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from project.contract import InputContract
from project.deploy.formats import ExportError
from project.deploy.triton import check_config, triton_inputs
from project.utils import sha256_file


@pytest.fixture(scope="module")
def triton_export(trained_run, tmp_path_factory, compose_export) -> Path:
    """The deepsets run exported with triton=true (ONNX only: the libtorch model is traced
    for the repository)."""
    from project.deploy.export import run_export

    out = tmp_path_factory.mktemp("triton-export")
    cfg = compose_export(
        [f"run_dir={trained_run('deepsets')}", f"output_dir={out}", "name=deepsets",
         "devices=[cpu]", "formats=[onnx]", "triton=true"]
    )  # fmt: skip
    return run_export(cfg).export_dir


def _contract(export_dir: Path) -> InputContract:
    return InputContract.from_dict(
        json.loads((export_dir / "manifest.json").read_text())["contract"]
    )


def test_repository_layout_and_manifest_entry(triton_export: Path) -> None:
    manifest = json.loads((triton_export / "manifest.json").read_text())
    entry = manifest["triton"]
    assert entry["repository"] == "triton"
    assert set(entry["models"]) == {"deepsets", "deepsets_libtorch"}
    repo = triton_export / "triton"
    assert (repo / "deepsets" / "config.pbtxt").is_file()
    assert (repo / "deepsets" / "1" / "model.onnx").is_file()
    assert (repo / "deepsets_libtorch" / "config.pbtxt").is_file()
    assert (repo / "deepsets_libtorch" / "1" / "model.pt").is_file()
    for model in entry["models"].values():
        assert sha256_file(triton_export / model["file"]) == model["sha256"]
        assert model["golden_max_abs"] <= 1e-4  # checked at export under the format's tolerance


def test_configs_parse_with_tritons_protobuf_and_match_the_graph(triton_export: Path) -> None:
    contract = _contract(triton_export)
    repo = triton_export / "triton"
    onnx_config = check_config(repo / "deepsets", contract)
    torch_config = check_config(repo / "deepsets_libtorch", contract)
    assert onnx_config.platform == "onnxruntime_onnx"
    assert torch_config.platform == "pytorch_libtorch"
    # What check_config checks, spelled out for the ONNX model: every graph input is a config
    # input or Triton's batch input, with the graph's data type and rank.
    graph = onnx.load(repo / "deepsets" / "1" / "model.onnx").graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    declared = {i.name: i for i in onnx_config.input}
    (offsets,) = onnx_config.batch_input
    assert sorted([*declared, offsets.target_name[0]]) == sorted(types)
    assert offsets.target_name[0] == "part_offsets"
    assert model_config_pb2.BatchInput.Kind.Name(offsets.kind) == (
        "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO"
    )
    assert list(offsets.source_input) == ["part_deta"]
    assert types["part_offsets"] == onnx.TensorProto.INT32
    for name in contract.flat_names:
        assert list(declared[name].dims) == [1]
        assert list(declared[name].reshape.shape) == []
        assert types[name] == onnx.TensorProto.FLOAT
    for name in contract.jagged[0].field_input_names:
        assert list(declared[name].dims) == [-1]
        assert declared[name].allow_ragged_batch
    assert [o.name for o in onnx_config.output] == list(contract.outputs)
    assert onnx_config.max_batch_size >= 1
    # The PyTorch backend names tensors by position.
    assert [i.name for i in torch_config.input] == [
        f"{n}__{i}" for i, n in enumerate(contract.input_names) if n != "part_offsets"
    ]
    position = contract.input_names.index("part_offsets")
    assert torch_config.batch_input[0].target_name[0] == f"part_offsets__{position}"


def test_triton_models_replay_the_golden_set_and_a_view(triton_export: Path) -> None:
    """What Triton hands the models: int32 offsets (its batch input), float32 fields; a
    request batch is offsets from 0, and a view (offsets from k > 0) gives the same rows."""
    contract = _contract(triton_export)
    golden = dict(np.load(triton_export / "golden.npz"))
    inputs = triton_inputs(golden, contract)
    pos = contract.input_names.index("part_offsets")
    view = list(inputs)
    first, stop = 10, 40
    for i in range(len(contract.flat)):
        view[i] = inputs[i][first:stop]
    view[pos] = np.ascontiguousarray(inputs[pos][first : stop + 1])
    assert view[pos][0] > 0
    repo = triton_export / "triton"
    session = ort.InferenceSession(str(repo / "deepsets" / "1" / "model.onnx"))
    module = torch.jit.load(str(repo / "deepsets_libtorch" / "1" / "model.pt"))
    for case, rows in ((inputs, slice(None)), (view, slice(first, stop))):
        by_onnx = session.run(None, dict(zip(contract.input_names, case, strict=True)))
        with torch.inference_mode():
            by_torch = [t.numpy() for t in module(*(torch.from_numpy(a) for a in case))]
        for name, a, b in zip(contract.outputs, by_onnx, by_torch, strict=True):
            np.testing.assert_allclose(a, golden[name][rows], atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(b, golden[name][rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("data_type: TYPE_FP32", "data_type: TYPE_INT64", 1), "is TYPE_INT64"),
        (lambda t: t.replace("allow_ragged_batch: true", "", 1), "allow_ragged_batch"),
        (lambda t: t.replace('name: "part_dr"', 'name: "part_dR"', 1), "are not the graph's"),
        (lambda t: t.replace("data_type: TYPE_INT32", "data_type: TYPE_INT64", 1), "int32"),
    ],
)
def test_check_config_refuses_a_config_that_does_not_match(
    triton_export: Path, tmp_path: Path, edit, message: str
) -> None:
    model_dir = shutil.copytree(triton_export / "triton" / "deepsets", tmp_path / "deepsets")
    config = model_dir / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    with pytest.raises(ExportError, match=message):
        check_config(model_dir, _contract(triton_export))


def test_config_with_an_unknown_field_does_not_parse(triton_export: Path) -> None:
    text = (triton_export / "triton" / "deepsets" / "config.pbtxt").read_text()
    text_format.Parse(text, model_config_pb2.ModelConfig())
    with pytest.raises(text_format.ParseError, match="allow_ragged_batches"):
        text_format.Parse(
            text.replace("allow_ragged_batch", "allow_ragged_batches"),
            model_config_pb2.ModelConfig(),
        )


def test_repository_follows_the_umask(triton_export: Path) -> None:
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for path in [triton_export / "triton", *(triton_export / "triton").rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path

"""What the field's consumers take from an export as it is: views of a sub-range of a
collection in every format, plain-identifier dimension names, the saved ExportedProgram, an
ONNX file that describes itself to a bare ONNX Runtime session, a manifest that says the call
order, the tolerance and what the golden set holds, and files others can read."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from project.contract import (
    MANIFEST_SCHEMA_FILE,
    OFFSETS_DIM,
    OFFSETS_RULE,
    InputContract,
    manifest_schema,
)
from project.deploy.manifest import validate_manifest
from project.inference.backends import open_backend
from project.utils import sha256_file


def _manifest(export_dir: Path) -> dict:
    return json.loads((export_dir / "manifest.json").read_text())


def _load_program(path: Path):
    """The saved torch.export program as a module (as the parity check loads it)."""
    program = torch.export.load(str(path))
    try:
        return program.module(check_guards=False)
    except TypeError:  # a torch without the argument has no such guard
        return program.module()


def _runner(export_dir: Path, artifact: dict):
    path = export_dir / artifact["file"]
    if artifact["format"] == "exported_program":
        module = _load_program(path)

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            with torch.inference_mode():
                return [t.numpy() for t in module(*(torch.from_numpy(a) for a in inputs))]

        return run
    backend = open_backend(artifact["format"], path)
    return lambda inputs: [t.numpy() for t in backend([torch.from_numpy(a) for a in inputs])]


def _rows(golden, contract: InputContract, first: int, stop: int) -> list[np.ndarray]:
    """Rows [first, stop) of the golden set cut out: offsets from 0, fields of those rows."""
    out = [golden[n][first:stop] for n in contract.flat_names]
    for coll in contract.jagged:
        offsets = golden[coll.offsets_name]
        lo, hi = offsets[first], offsets[stop]
        out.append(offsets[first : stop + 1] - lo)
        out += [golden[n][lo:hi] for n in coll.field_input_names]
    return out


def _view(golden, contract: InputContract, first: int, stop: int) -> list[np.ndarray]:
    """The same rows as a framework's view: offsets[first : stop + 1] (starting at k > 0) into
    the collection's whole field arrays, which go on past offsets[stop]."""
    out = [golden[n][first:stop] for n in contract.flat_names]
    for coll in contract.jagged:
        out.append(np.ascontiguousarray(golden[coll.offsets_name][first : stop + 1]))
        out += [golden[n] for n in coll.field_input_names]
    return out


def test_offsets_views_equal_the_rows_cut_out_in_every_format(exported, each_model: str) -> None:
    export_dir = exported(each_model)
    manifest = _manifest(export_dir)
    contract = InputContract.from_dict(manifest["contract"])
    golden = np.load(export_dir / "golden.npz")
    first, stop = 5, 37
    view, cut = _view(golden, contract, first, stop), _rows(golden, contract, first, stop)
    if contract.jagged:
        offsets = view[len(contract.flat)]
        assert offsets[0] > 0
        assert len(view[len(contract.flat) + 1]) > offsets[-1]  # fields go on past the view
        # Every artifact's parity check ran such a view too.
        assert "offsets_view" in manifest["parity"]["cases"]
    assert {a["format"] for a in manifest["artifacts"]} == {
        "torchscript",
        "aoti",
        "onnx",
        "exported_program",
    }
    for artifact in manifest["artifacts"]:
        run = _runner(export_dir, artifact)
        tol = manifest["tolerance"][artifact["format"]]
        got_view, got_cut = run(view), run(cut)
        for name, v, c in zip(contract.outputs, got_view, got_cut, strict=True):
            expected = golden[name][first:stop]
            np.testing.assert_allclose(v, c, atol=tol["abs"], rtol=tol["rel"])
            np.testing.assert_allclose(v, expected, atol=tol["abs"], rtol=tol["rel"])


def test_exported_program_is_saved_hashed_and_loads_back(exported) -> None:
    export_dir = exported("deepsets")
    manifest = _manifest(export_dir)
    contract = InputContract.from_dict(manifest["contract"])
    entry = next(a for a in manifest["artifacts"] if a["format"] == "exported_program")
    assert entry["file"] == "program.pt2"  # model.pt2 is AOTInductor's package
    assert entry["passed"]
    assert sha256_file(export_dir / entry["file"]) == entry["sha256"]
    # The program's own symbols (s0, s0 + 1) are recorded under the contract's dimension names.
    assert set(entry["range_constraints"]) == set(contract.input_dims.values())
    assert entry["range_constraints"]["batch"]["min"] == "1"
    program = torch.export.load(str(export_dir / entry["file"]))
    assert len(program.graph_signature.user_inputs) == len(contract.input_names)
    golden = np.load(export_dir / "golden.npz")
    module = _load_program(export_dir / entry["file"])
    with torch.inference_mode():
        outputs = module(*(torch.from_numpy(golden[n]) for n in contract.input_names))
        one_row = module(*(torch.from_numpy(a) for a in _rows(golden, contract, 3, 4)))
    for name, got, row in zip(contract.outputs, outputs, one_row, strict=True):
        np.testing.assert_allclose(got.numpy(), golden[name], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(row.numpy(), golden[name][3:4], atol=1e-5, rtol=1e-5)


def test_dimension_names_are_plain_identifiers(exported, each_model: str) -> None:
    export_dir = exported(each_model)
    manifest = _manifest(export_dir)
    model = onnx.load(export_dir / "model.onnx")
    graph = model.graph
    params = {
        d.dim_param
        for v in [*graph.input, *graph.output, *graph.value_info]
        for d in v.type.tensor_type.shape.dim
        if d.dim_param
    }
    assert params, "the ONNX graph has no symbolic dimensions"
    assert all(p.isidentifier() for p in params), sorted(params)
    inputs = {v.name: v.type.tensor_type.shape.dim[0].dim_param for v in graph.input}
    assert inputs == {i["name"]: i["shape"][0] for i in manifest["inputs"]}
    if manifest["contract"]["jagged"]:
        assert OFFSETS_DIM in params
    for spec in [*manifest["inputs"], *manifest["outputs"]]:
        assert all(d.isidentifier() for d in spec["shape"])
    assert all(d.isidentifier() for d in manifest["dims"])
    for artifact in manifest["artifacts"]:
        assert all(d.isidentifier() for d in artifact.get("range_constraints", {}))


def test_onnx_metadata_rebuilds_the_inputs_in_a_bare_session(exported) -> None:
    """A consumer with only model.onnx (ONNX Runtime in a C++ framework) reads the contract,
    the call order, the outputs, the tolerance and the provenance from metadata_props."""
    export_dir = exported("deepsets")
    session = ort.InferenceSession(
        str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    meta = session.get_modelmeta().custom_metadata_map
    contract = InputContract.from_json(meta["contract"])
    inputs = json.loads(meta["inputs"])
    assert [i["name"] for i in inputs] == [i.name for i in session.get_inputs()]
    assert [i["position"] for i in inputs] == list(range(len(inputs)))
    assert [i["name"] for i in inputs] == contract.input_names
    assert all(i["expr"] for i in inputs)
    assert meta["offsets_rule"] == OFFSETS_RULE
    assert json.loads(meta["classes"]) == list(contract.classes)
    outputs = json.loads(meta["outputs"])
    assert [o["name"] for o in outputs] == [o.name for o in session.get_outputs()]
    tol = json.loads(meta["tolerance"])
    manifest = _manifest(export_dir)
    assert tol == manifest["tolerance"]["onnx"]
    for key in ("git_commit", "torch", "onnx", "onnxruntime", "python"):
        assert meta[key] == str(manifest["provenance"][key]), key
    assert json.loads(meta["git_dirty"]) == manifest["provenance"]["git_dirty"]
    # The inputs rebuilt from the metadata alone: names, dtypes, raw values from the golden set.
    golden = np.load(export_dir / "golden.npz")
    feed = {i["name"]: golden[i["name"]].astype(i["dtype"]) for i in inputs}
    got = session.run([o["name"] for o in outputs], feed)
    for o, value in zip(outputs, got, strict=True):
        np.testing.assert_allclose(value, golden[o["name"]], atol=tol["abs"], rtol=tol["rel"])
    # The standardisation constants travel too: the consumer can read what the graph applies.
    assert contract.fitted


def test_manifest_states_call_order_tolerance_and_golden_contents(exported, each_model) -> None:
    export_dir = exported(each_model)
    manifest = _manifest(export_dir)
    contract = InputContract.from_dict(manifest["contract"])
    validate_manifest(manifest)
    # The schema ships with the export, and the manifest's hash beside it.
    shipped = json.loads((export_dir / "manifest.schema.json").read_text())
    assert shipped == manifest_schema() == json.loads(MANIFEST_SCHEMA_FILE.read_text())
    assert (export_dir / "manifest.sha256").read_text().strip() == sha256_file(
        export_dir / "manifest.json"
    )
    # Inputs in call order, each with its source expression; the artifacts take them so.
    assert [i["position"] for i in manifest["inputs"]] == list(range(len(contract.input_names)))
    assert [i["name"] for i in manifest["inputs"]] == contract.input_names
    assert {i["name"]: i["expr"] for i in manifest["inputs"]} == contract.input_exprs
    ts = torch.jit.load(str(export_dir / "model.ts"))
    assert len(ts.forward.schema.arguments) - 1 == len(manifest["inputs"])  # self
    onnx_inputs = [v.name for v in onnx.load(export_dir / "model.onnx").graph.input]
    assert onnx_inputs == contract.input_names
    assert manifest["offsets_rule"] == OFFSETS_RULE
    # A top-level tolerance per exported format, the one each artifact's parity used.
    for artifact in manifest["artifacts"]:
        for row in artifact["parity"]:
            assert row["tolerance"] == manifest["tolerance"][artifact["format"]]
    # golden.arrays lists exactly what golden.npz holds, with roles, dtypes and shapes.
    golden = np.load(export_dir / "golden.npz")
    arrays = manifest["golden"]["arrays"]
    assert set(arrays) == set(golden.files)
    for name, spec in arrays.items():
        assert spec["dtype"] == str(golden[name].dtype)
        assert spec["shape"] == list(golden[name].shape)
    roles = {name: spec["role"] for name, spec in arrays.items()}
    assert {n for n, r in roles.items() if r == "input"} == set(contract.input_names)
    assert {n for n, r in roles.items() if r == "output"} == set(contract.outputs)
    assert roles.get("labels") == "label"


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
    }


def test_published_export_is_readable_as_the_umask_says(exported) -> None:
    export_dir = exported("mlp")
    mask = os.umask(0)
    os.umask(mask)
    for name, mode in _modes(export_dir).items():
        is_dir = (export_dir / name).is_dir()
        assert mode == (0o777 if is_dir else 0o666) & ~mask, (name, oct(mode))


def test_export_follows_another_umask_and_overwrite_keeps_it(
    trained_run, tmp_path: Path, compose_export
) -> None:
    from project.deploy.export import run_export

    out = tmp_path / "exported"
    overrides = [
        f"run_dir={trained_run('mlp')}",
        f"output_dir={out}",
        "name=mlp",
        "devices=[cpu]",
        "formats=[torchscript]",
        "triton=false",
    ]
    previous = os.umask(0o027)
    try:
        run_export(compose_export(overrides))
        first = _modes(out / "mlp")
        run_export(compose_export([*overrides, "overwrite=true"]))
        second = _modes(out / "mlp")
    finally:
        os.umask(previous)
    for modes in (first, second):
        assert modes["."] == 0o750
        assert {m for n, m in modes.items() if n != "."} == {0o640}, modes
    assert sorted(p.name for p in out.iterdir()) == ["mlp"]


def test_parity_view_case_is_a_view_of_the_same_rows() -> None:
    from project.contract import Feature, JaggedCollection
    from project.deploy.parity import offsets_view

    contract = InputContract(
        flat=(Feature("a"),), jagged=(JaggedCollection("p", 4, (Feature("x"),)),)
    )
    case = [np.ones(3, np.float32), np.array([0, 2, 2, 5]), np.arange(5, dtype=np.float32)]
    flat, offsets, field = offsets_view(case, contract)
    np.testing.assert_array_equal(flat, case[0])
    assert offsets[0] > 0
    assert len(field) > offsets[-1]
    np.testing.assert_array_equal(np.diff(offsets), np.diff(case[1]))
    np.testing.assert_array_equal(field[offsets[0] : offsets[-1]], case[2])

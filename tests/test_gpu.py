"""GPU paths: device-resident batches, training on a GPU, CUDA exports. Skipped without CUDA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from project.data.datamodule import SoADataModule
from project.data.sources.toy import ToyJetSource
from project.soa.assembler import SoAAssembler

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def _contract() -> dict:
    return yaml.safe_load((ROOT / "configs/data/contract/jets.yaml").read_text())


def test_resident_batches_assemble_like_host_batches() -> None:
    dm = SoADataModule(ToyJetSource(3000, 5), _contract())
    dm.setup()
    host = dm._tensors["train"]
    device = SoADataModule(ToyJetSource(3000, 5), _contract())
    device.setup()
    on_gpu = device._tensors["train"].to("cuda")
    assembler = SoAAssembler(dm.contract)
    names = dm.contract.input_names
    rows = torch.randperm(host.n_rows, generator=torch.Generator().manual_seed(1))[:777]
    a = assembler([host.batch(rows)[n] for n in names])
    b = assembler.to("cuda")([on_gpu.batch(rows.cuda())[n] for n in names])
    torch.testing.assert_close(a[0], b[0].cpu())
    for x, y in zip(a[1] + a[2], b[1] + b[2], strict=True):
        torch.testing.assert_close(x, y.cpu())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_on_gpu_with_resident_data(
    tmp_path: Path, precision: str, fast_overrides, compose_train
) -> None:
    from project.training.run import train

    cfg = compose_train(
        [*fast_overrides, "trainer=gpu", "model=transformer", "trainer.max_epochs=2", "data.resident=true",
         f"trainer.precision={precision}", "model.compile=false", "trainer.gradient_clip_val=1.0"],
        tmp_path,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["test/auroc"] > 0.8
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert summary["world_size"] == 1
    # Every full-size batch replayed the CUDA graph (an epoch's short last batch steps
    # eagerly), eight batches to a Lightning step (model.steps_per_call=auto).
    rows, size = summary["data"]["rows"]["train"], cfg.data.batch_size
    batches = math.ceil(rows / size)
    assert summary["global_step"] == 2 * math.ceil(batches / 8)
    assert summary["cuda_graph_steps"] == 2 * (rows // size)


def _fit_on_gpu(cfg, **module_options) -> tuple[dict, dict, object]:
    """Train ``cfg``'s model (seeded: the same initial weights every time) for two epochs on
    the GPU, clipping gradients; its initial and final weights, and the module."""
    import hydra
    import lightning as L

    L.seed_everything(3)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = hydra.utils.instantiate(
        cfg.model, contract=datamodule.contract.to_dict(), **module_options
    )
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_epochs=2, gradient_clip_val=0.5, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    final = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return initial, final, module


def test_graphed_whole_step_trains_like_eager(
    tmp_path: Path, fast_overrides, compose_train
) -> None:
    """From the same weights, on the same batches, with clipping and a per-epoch cosine
    schedule: the whole step replayed from a CUDA graph (8 steps per Lightning step, the
    gather inside the graph) ends where Lightning's own eager steps end; with the network
    compiled inside the graph, within the compiler's rounding."""
    cfg = compose_train(
        [*fast_overrides, "trainer=gpu", "model=mlp", "model.net.dropout=0.0",
         "data.resident=true", "data.source.n_jets=2000", "+model.optimizer.fused=true",
         "+model.optimizer.capturable=true", "model.scheduler.T_max=4"],
        tmp_path,
    )  # fmt: skip
    initial, eager, module = _fit_on_gpu(cfg, cuda_graphs=False, steps_per_call=1, compile=False)
    assert module.cuda_graph_steps == 0
    rows = len(module.trainer.datamodule.splits["train"])
    full_batches = 2 * (rows // cfg.data.batch_size)  # two epochs; not the short last batch
    runs = {}
    for compiled in (False, True):
        start, runs[compiled], module = _fit_on_gpu(cfg, compile=compiled)
        assert all(torch.equal(start[k], initial[k]) for k in initial)
        assert module.steps_per_call == 8
        assert module.cuda_graph_steps == full_batches  # the short last batches stepped eagerly
        lr = module.optimizers().param_groups[0]["lr"]
        assert lr == pytest.approx(cfg.model.optimizer.lr * 0.5)  # cosine: 2 of 4 epochs
    for name, value in eager.items():
        torch.testing.assert_close(runs[False][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(runs[True][name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert not torch.equal(eager["model.net.head.weight"], initial["model.net.head.weight"].cpu())


def test_cuda_artifacts_are_exported_and_checked(
    tmp_path: Path, fast_overrides, compose_train, compose_export
) -> None:
    from project.deploy.export import run_export
    from project.training.run import train

    cfg = compose_train([*fast_overrides, "model=deepsets", "trainer.max_epochs=1"], tmp_path)
    train(cfg)
    export = compose_export(
        [f"run_dir={cfg.paths.output_dir}", f"output_dir={tmp_path / 'exported'}", "name=gpu",
         "devices=[cpu,cuda]", "allow_partial=true"]
    )  # fmt: skip
    manifest = run_export(export).manifest
    by_key = {(a["format"], a["device"]): a for a in manifest["artifacts"]}
    by_key.update({tuple(k.split("/")): None for k in manifest["failed_artifacts"]})
    # Every requested format/device pair has a verdict (a crash while loading counts as a FAIL).
    assert {("torchscript", "cuda"), ("aoti", "cuda")} <= set(by_key)
    assert "cuda" in manifest["parity"]["table"]
    ts_cuda = by_key[("torchscript", "cuda")]
    assert ts_cuda is not None
    assert ts_cuda["passed"]


# --- Inference on the device -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_export(tmp_path_factory, fast_overrides, compose_train, compose_export) -> Path:
    """A toy deep-sets run trained on the GPU and exported for the CPU and CUDA (TorchScript,
    AOTInductor, ONNX); an artifact that fails parity is recorded, not published as passed."""
    from project.deploy.export import run_export
    from project.inference.threads import ThreadPolicy, apply_torch_policy
    from project.training.run import train

    # The deployment policy before the training's thread pools exist (see test_inference.py).
    intra = torch.get_num_threads()
    apply_torch_policy(ThreadPolicy.single())
    torch.set_num_threads(intra)
    tmp = tmp_path_factory.mktemp("cuda-export")
    cfg = compose_train(
        [*fast_overrides, "trainer=gpu", "model=deepsets", "data.source.n_jets=1500"], tmp
    )
    train(cfg)
    export = compose_export(
        [f"run_dir={cfg.paths.output_dir}", f"output_dir={tmp / 'exported'}", "name=deepsets",
         "devices=[cpu,cuda]", "formats=[torchscript,aoti,onnx]", "allow_partial=true"]
    )  # fmt: skip
    yield run_export(export).export_dir
    torch.set_num_threads(intra)


def _golden(export_dir: Path) -> dict:
    import numpy as np

    with np.load(export_dir / "golden.npz") as data:
        return {k: data[k] for k in data.files}


def _spy(model) -> list[list[int]]:
    """Record the data pointers of the inputs of every backend call."""
    seen: list[list[int]] = []
    call = model.runner.call

    def spy(tensors):
        seen.append([t.data_ptr() for t in tensors])
        return call(tensors)

    model.runner.call = spy
    return seen


def _tolerance(export_dir: Path, fmt: str) -> dict:
    tol = json.loads((export_dir / "manifest.json").read_text())["tolerance"][fmt]
    return {"atol": tol["abs"], "rtol": tol["rel"]}


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_cuda_inference_from_cuda_tensors(cuda_export: Path, fmt: str) -> None:
    """CUDA tensors in, without a copy (the offsets, clamped on the device, are the one copy);
    CUDA tensors out, equal to the golden outputs. An AOTInductor package that failed its
    parity check is passed over by the default choice and refused by name, with the reason."""
    import numpy as np

    from project.inference import ArtifactError, load

    manifest = json.loads((cuda_export / "manifest.json").read_text())
    entry = next(
        (a for a in manifest["artifacts"] if (a["format"], a["device"]) == (fmt, "cuda")), None
    )
    default = load(cuda_export, device="cuda")
    if entry is None or not entry["passed"]:
        assert default.backend != fmt
        assert any(note.startswith(f"{fmt}:") for note in default.selection), default.selection
        with pytest.raises(ArtifactError, match=f"{fmt}: (failed its parity|no cuda artifact)"):
            load(cuda_export, fmt, device="cuda")
        return
    model = load(cuda_export, fmt, device="cuda")
    assert model.device == torch.device("cuda", torch.cuda.current_device())
    gold = _golden(cuda_export)
    cols = {n: torch.from_numpy(gold[n]).cuda() for n in model.input_names}
    seen = _spy(model)
    got = model(cols)
    offsets = model.contract.jagged[0].offsets_name
    for name, pointer in zip(model.input_names, seen[0], strict=True):
        assert (pointer == cols[name].data_ptr()) == (name != offsets), name
    for name in model.output_names:
        assert got[name].device == model.device
        assert got[name].dtype == torch.float32
        np.testing.assert_allclose(
            got[name].cpu().numpy(), gold[name], **_tolerance(cuda_export, fmt)
        )
    host = model(cols, to_host=True)
    for name in model.output_names:
        assert isinstance(host[name], np.ndarray)
        np.testing.assert_array_equal(host[name], got[name].cpu().numpy())
    model.synchronize()


def test_cuda_inference_from_dlpack_and_the_cuda_array_interface(cuda_export: Path) -> None:
    """CuPy arrays (DLPack) and objects that only have ``__cuda_array_interface__`` are taken in
    place, also on a CuPy stream of the caller's (``stream=``: the stream object or its
    handle); the results equal those of torch tensors."""
    import cupy as cp

    from project.inference import load

    model = load(cuda_export, device="cuda")
    gold = _golden(cuda_export)
    expected = model({n: torch.from_numpy(gold[n]).cuda() for n in model.input_names})

    class OnlyInterface:
        def __init__(self, arr) -> None:
            self.__cuda_array_interface__ = arr.__cuda_array_interface__
            self.arr = arr

    offsets = model.contract.jagged[0].offsets_name
    stream = cp.cuda.Stream(non_blocking=True)
    for how in ("dlpack", "interface", "stream", "handle"):
        with stream if how in ("stream", "handle") else cp.cuda.Stream.null:
            arrays = {n: cp.asarray(gold[n]) * 1 for n in model.input_names}  # made on that stream
            cols = (
                arrays if how != "interface" else {n: OnlyInterface(a) for n, a in arrays.items()}
            )
            seen = _spy(model)
            given = {"stream": stream, "handle": stream.ptr}.get(how)
            got = model(cols, stream=given) if given is not None else model(cols)
            del model.runner.call
        stream.synchronize()
        for name, pointer in zip(model.input_names, seen[0], strict=True):
            assert (pointer == arrays[name].data.ptr) == (name != offsets), (how, name)
        for name in model.output_names:
            assert got[name].is_cuda
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
    model.synchronize()


def test_cuda_value_checks_do_not_wait(cuda_export: Path) -> None:
    """NaN/Inf and offsets are checked on the device without synchronising the stream: a call
    returns while the stream is still busy, and its verdict is reported by a later call (or
    ``synchronize()``); ``validate=True`` reports in the call, naming the column; offsets past
    the fields' end neither crash the device (no device-side assert) nor pass silently."""
    from project.inference import InputError, load

    model = load(cuda_export, device="cuda")
    gold = _golden(cuda_export)
    cols = {n: torch.from_numpy(gold[n]).cuda() for n in model.input_names}
    coll = model.contract.jagged[0]
    field = coll.field_input_names[0]
    nan_field = cols[field].clone()
    nan_field[5] = float("nan")
    past_end = cols[coll.offsets_name].clone()
    past_end[-1] += 1000
    for _ in range(3):  # calls 1 to 3: TorchScript optimises on its first calls
        model(cols)
    busy = torch.randn(8192, 8192, device="cuda")
    for _ in range(10):
        busy = busy @ busy
        busy /= busy.norm()
    model({**cols, field: nan_field})  # returns at once: no raise, no wait
    assert not torch.cuda.current_stream().query()
    with pytest.raises(InputError, match=r"call 4 of this thread on cuda.*NaN or Inf"):
        model.synchronize()
    model({**cols, coll.offsets_name: past_end})
    torch.cuda.synchronize()
    with pytest.raises(InputError, match=r"call 5 .*offsets or counts entries"):
        model(cols)  # the next call reports the earlier one, before running
    with pytest.raises(InputError, match=f"{field!r}: 1 NaN"):
        model({**cols, field: nan_field}, validate=True)
    with pytest.raises(InputError, match="point past the end"):
        model({**cols, coll.offsets_name: past_end}, validate=True)
    ignoring = model.with_nan_policy("ignore")
    ignoring({**cols, field: nan_field})
    ignoring.synchronize()  # NaN passed on; the offsets are still checked
    ignoring({**cols, coll.offsets_name: past_end})
    with pytest.raises(InputError, match="offsets or counts"):
        ignoring.synchronize()
    # The device still works: the same call as at first gives the same outputs.
    again = model(cols, to_host=True)
    first = load(cuda_export, device="cuda")(cols, to_host=True)
    for name in model.output_names:
        assert (again[name] == first[name]).all()


def test_cuda_chunks_counts_and_views(cuda_export: Path) -> None:
    """Chunks of ``max_batch`` rows, counts instead of offsets and an offsets view of the
    fields give the rows' outputs of one call."""
    from project.inference import load

    model = load(cuda_export, device="cuda")
    assert model.max_batch > 10**9  # no chunks by default on CUDA
    chunked = load(cuda_export, device="cuda", max_batch=7)
    gold = _golden(cuda_export)
    cols = {n: torch.from_numpy(gold[n]).cuda() for n in model.input_names}
    coll = model.contract.jagged[0]
    whole = model(cols)
    counts = {k: v for k, v in cols.items() if k != coll.offsets_name}
    counts[coll.counts_name] = torch.diff(cols[coll.offsets_name]).to(torch.int32)
    view = {**cols, coll.offsets_name: cols[coll.offsets_name][9:]}
    view.update({n: cols[n][9:] for n in model.contract.flat_names})
    for got, rows in (
        (chunked(cols), slice(None)),
        (model(counts), slice(None)),
        (model(view), slice(9, None)),
    ):
        for name in model.output_names:
            torch.testing.assert_close(got[name], whole[name][rows], rtol=1e-5, atol=1e-6)
    model.synchronize()
    chunked.synchronize()


def test_cpp_replays_golden_set_on_cuda(cuda_export: Path, tmp_path: Path) -> None:
    """The C++ consumer built with its CUDA path (``cpp/build.py --cuda``) replays the golden
    set through each CUDA artifact from device buffers of its own, every call enqueued on a
    stream of its own: all inputs but the offsets read in place, batch 1, the golden batch and
    a sub-range view within the manifest's tolerance, bad offsets and host memory refused, four
    threads on four streams identical to one. An artifact that failed parity is refused."""
    import importlib.util
    import re
    import subprocess

    def cpp_module(name: str):
        spec = importlib.util.spec_from_file_location(f"cpp_{name}", ROOT / "cpp" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    replay = cpp_module("build").build(cuda=True)
    golden = cpp_module("unpack_golden").unpack(cuda_export, tmp_path / "golden")
    manifest = json.loads((cuda_export / "manifest.json").read_text())
    n_inputs, n_offsets = len(manifest["inputs"]), len(manifest["contract"]["jagged"])
    rows = manifest["golden"]["rows"]
    for fmt in ("torchscript", "aoti"):
        entry = next(
            (a for a in manifest["artifacts"] if (a["format"], a["device"]) == (fmt, "cuda")), None
        )
        run = subprocess.run(
            [str(replay), str(cuda_export), str(golden), "--device", "cuda", "--format", fmt,
             "--threads", "4", "--min-time", "0.1"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        out = run.stdout + run.stderr
        if entry is None or not entry["passed"]:
            assert run.returncode == 2, out
            assert re.search(rf"failed the export's parity check|has no {fmt} artifact", out), out
            continue
        assert run.returncode == 0, out
        assert (
            f"[{fmt}] zero-copy: {n_inputs - n_offsets}/{n_inputs} inputs read the device "
            "buffers in place (on cuda:0" in run.stdout
        ), out
        for batch in (1, rows):
            assert re.search(rf"\[{fmt}\] batch={batch}\s+max\|diff\|=\S+ PASS", run.stdout), out
        assert re.search(rf"\[{fmt}\] view rows=\d+\.\.\d+ offsets from [1-9]\d* \S+ PASS", out)
        assert f"[{fmt}] inconsistent offsets refused: 3/3" in run.stdout, out
        assert run.stdout.count("entries break the offsets rule") == 3, out
        assert f"[{fmt}] host memory refused: column '" in run.stdout, out
        threads = next(ln for ln in run.stdout.splitlines() if ln.startswith(f"[{fmt}] threads="))
        assert threads.endswith("identical to one thread: yes"), threads
        assert "RESULT PASS" in run.stdout, out

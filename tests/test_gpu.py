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

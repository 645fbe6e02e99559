"""GPU paths: device-resident batches, training on a GPU, CUDA exports. Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from project.data.datamodule import SoADataModule
from project.data.sources.toy import ToyJetSource
from project.soa.assembler import SoAAssembler
from tests.conftest import FAST, ROOT, compose_export, compose_train

pytestmark = pytest.mark.gpu


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


def test_training_on_gpu_with_resident_data(tmp_path: Path) -> None:
    from project.training.run import train

    cfg = compose_train(
        [*FAST, "trainer=gpu", "model=transformer", "trainer.max_epochs=2", "data.resident=true"],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["test/auroc"] > 0.8
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert summary["world_size"] == 1


def test_cuda_artifacts_are_exported_and_checked(tmp_path: Path) -> None:
    from project.deploy.export import run_export
    from project.training.run import train

    cfg = compose_train([*FAST, "model=deepsets", "trainer.max_epochs=1"], tmp_path)
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

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
         f"trainer.precision={precision}"],
        tmp_path,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["test/auroc"] > 0.8
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert summary["world_size"] == 1
    # Every full-size batch replayed the CUDA graphs (an epoch's short last batch runs eagerly).
    assert summary["cuda_graph_steps"] >= summary["global_step"] - 2 > 0


def test_cuda_graphs_train_like_eager(tmp_path: Path, fast_overrides, compose_train) -> None:
    """From the same weights, on the same batches, graphed and eager training end equal."""
    import copy

    import hydra
    import lightning as L

    cfg = compose_train(
        [
            *fast_overrides,
            "trainer=gpu",
            "model=mlp",
            "model.net.dropout=0.0",
            "data.resident=true",
        ],
        tmp_path,
    )
    final, replayed = {}, {}
    state = None
    for graphs in (True, False):
        datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
        datamodule.setup("fit")
        module = hydra.utils.instantiate(
            cfg.model, contract=datamodule.contract.to_dict(), cuda_graphs=graphs
        )
        if state is None:
            state = copy.deepcopy(module.state_dict())
        module.load_state_dict(state)
        trainer = L.Trainer(
            accelerator="gpu", devices=1, max_steps=25, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
        final[graphs] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        replayed[graphs] = module.cuda_graph_steps
    assert replayed[False] == 0
    assert replayed[True] >= 20
    assert final[True].keys() == final[False].keys()
    for name, value in final[True].items():
        torch.testing.assert_close(value, final[False][name], rtol=1e-4, atol=1e-5, msg=name)
    # and training moved the weights at all
    moved = [k for k in state if not torch.equal(state[k].cpu(), final[True][k])]
    assert moved


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

"""CUDA graphs for the training step: when they are used, and the eager fallback.

The captured graphs themselves need a GPU (tests/test_gpu.py); here: the conditions that
switch them off, and that a capture that cannot happen leaves training eager, with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from project.training.graphs import GraphedForward, graphs_unavailable


def test_graphs_are_used_only_on_one_cuda_device_without_accumulation() -> None:
    cuda = torch.device("cuda", 0)
    assert graphs_unavailable(cuda, 1, 1, compiled=False) is None
    assert "cpu" in graphs_unavailable(torch.device("cpu"), 1, 1, compiled=False)
    assert "2 processes" in graphs_unavailable(cuda, 2, 1, compiled=False)
    assert "accumulated over 4" in graphs_unavailable(cuda, 1, 4, compiled=False)
    assert "torch.compile" in graphs_unavailable(cuda, 1, 1, compiled=True)


def test_failed_capture_falls_back_to_eager_with_a_warning() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    graphed = GraphedForward(lambda cols: net(torch.stack(cols, 1)))  # type: ignore[arg-type]
    columns = [torch.randn(5) for _ in range(3)]
    # CPU tensors cannot be captured in a CUDA graph: the capture fails, the batch (and every
    # later one) is left to the eager path.
    with pytest.warns(UserWarning, match="training runs eagerly"):
        assert graphed(columns) is None
    assert graphed.failed is not None
    assert graphed(columns) is None
    assert graphed.replays == 0


def test_training_off_cuda_runs_eagerly_with_no_graph_steps(train_cfg) -> None:
    from project.training.run import train

    assert train_cfg.model.cuda_graphs is True  # the default; the CPU switches it off
    train(train_cfg)
    summary = json.loads((Path(train_cfg.paths.output_dir) / "metrics.json").read_text())
    assert summary["global_step"] > 0
    assert summary["cuda_graph_steps"] == 0


def test_bookkeeping_attributes_stay_out_of_the_state_dict(train_cfg) -> None:
    import hydra

    from project.data.datamodule import SoADataModule

    dm: SoADataModule = hydra.utils.instantiate(train_cfg.data, _convert_="all")
    dm.setup("fit")
    module = hydra.utils.instantiate(train_cfg.model, contract=dm.contract.to_dict())
    keys = set(module.state_dict())
    module._loss_sum = torch.ones(())  # set directly, bypassing nn.Module's registry
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step"
    assert torch.equal(module._loss_sum, torch.ones(()))
    assert set(module.state_dict()) == keys


def test_columns_of_one_matrix_reach_the_graph_in_one_copy() -> None:
    from project.training.graphs import _Matrix

    first = torch.randn(5, 3)
    columns = [*first.unbind(1), torch.ones(5)]
    (matrix,) = _Matrix.find(columns)  # the three columns of `first`; the last stands alone
    assert matrix.positions == {0: 0, 1: 1, 2: 2}
    second = torch.randn(5, 3)
    loaded = matrix.load([*second.unbind(1), torch.zeros(5)])
    # The graph's buffers, now holding the new batch, in place of the batch's columns.
    assert all(loaded[i].data_ptr() == matrix.views[i].data_ptr() for i in range(3))
    torch.testing.assert_close(torch.stack(loaded[:3], 1), second)
    assert torch.equal(loaded[3], torch.zeros(5))
    # Columns laid out otherwise (separate tensors, another column order) are left as they
    # are; the graph then copies them one by one.
    separate = [torch.randn(5) for _ in range(3)] + [torch.zeros(5)]
    assert matrix.load(separate) is separate
    swapped = second.unbind(1)
    reordered = [swapped[1], swapped[0], swapped[2], torch.zeros(5)]
    assert matrix.load(reordered) is reordered


def test_graphs_are_released_when_batch_shapes_keep_changing() -> None:
    # The capture itself needs a GPU; the shape policy around it does not. A stand-in for the
    # captured graphs records which batches reach it.
    graphed = GraphedForward(torch.nn.Identity())
    replayed: list[int] = []
    graphed._graphed = lambda *cols: replayed.append(len(cols[0])) or cols[0]
    graphed.shapes = (torch.Size([4]),)
    # Full batches replay; an epoch's short last batch alone does not end the graphs.
    for n in [4, 4, 4, 3, 4, 4]:
        out = graphed([torch.zeros(n)])
        assert (out is None) == (n != 4)
    assert graphed.replays == 5
    assert graphed.other_shapes == 1
    assert graphed.failed is None
    # Batches whose shapes keep changing (jagged batches formed on the host): released.
    for n in range(5, 5 + GraphedForward.give_up_after + 5):
        assert graphed([torch.zeros(n)]) is None
    assert graphed.failed == "the input shapes vary from batch to batch"
    assert graphed._graphed is None
    assert graphed([torch.zeros(4)]) is None  # eager from now on
    assert replayed == [4] * 5

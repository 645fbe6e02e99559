"""The training step's modes: CUDA graphs (when they are used, the eager fallback, what a
replay keeps in step with) and several optimiser steps per Lightning step.

The captured graph itself needs a GPU (tests/test_gpu.py); here: the conditions that switch
it off, the policy around a replay, and on the CPU that the module's own stepping (what the
graph replays) equals Lightning's, step for step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from project.training.graphs import GraphedStep, align_step_flags, graphs_unavailable


def test_graphs_are_used_only_on_one_cuda_device_with_a_capturable_step() -> None:
    cuda = torch.device("cuda", 0)
    adamw = torch.optim.AdamW
    assert graphs_unavailable(cuda, 1, 1, "32-true", adamw) is None
    assert graphs_unavailable(cuda, 1, 1, "bf16-mixed", torch.optim.Adam) is None
    assert "cpu" in graphs_unavailable(torch.device("cpu"), 1, 1, "32-true", adamw)
    assert "2 processes" in graphs_unavailable(cuda, 2, 1, "32-true", adamw)
    assert "accumulated over 4" in graphs_unavailable(cuda, 1, 4, "32-true", adamw)
    assert "gradient scaler" in graphs_unavailable(cuda, 1, 1, "16-mixed", adamw)
    assert "SGD" in graphs_unavailable(cuda, 1, 1, "32-true", torch.optim.SGD)


def _stepper() -> tuple[torch.nn.Module, torch.optim.Optimizer, GraphedStep]:
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    return net, optimizer, GraphedStep(lambda inputs: net(inputs["x"]).sum(), optimizer, net)


def test_failed_capture_falls_back_to_eager_with_a_warning() -> None:
    _, _, graphed = _stepper()
    # CPU tensors cannot be captured in a CUDA graph: the capture fails, the batch (and every
    # later one) is left to the eager path.
    with pytest.warns(UserWarning, match="training steps run eagerly"):
        assert graphed({"x": torch.randn(5, 3)}) is None
    assert graphed.failed is not None
    assert graphed({"x": torch.randn(5, 3)}) is None
    assert graphed.replays == 0


def test_the_warm_up_before_a_capture_is_undone() -> None:
    """Warm-up steps (what a capture needs first) leave weights, optimiser and generator as
    they were: a fresh AdamW's state zeroed is how AdamW starts, a resumed one's is put back;
    the next step equals the step of a run that never warmed up, bitwise."""

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, GraphedStep]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Dropout(0.3), torch.nn.Linear(4, 1)
        )
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)

        def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = net(inputs["x"]).square().mean()
            loss.backward()
            optimizer.step()
            return loss.detach()

        return net, optimizer, GraphedStep(step, optimizer, net)

    x = {"x": torch.randn(8, 3)}

    def both(a: GraphedStep, b: GraphedStep, seed: int) -> None:  # the same dropout masks
        torch.manual_seed(seed)
        a.step(x)
        torch.manual_seed(seed)
        b.step(x)

    for resumed in (False, True):
        net, optimizer, graphed = build()
        reference, ref_optimizer, ref_graphed = build()
        for seed in range(2 if resumed else 0):  # a run that has stepped already
            both(graphed, ref_graphed, seed)
        generator = torch.get_rng_state()
        graphed._warm_up(x)
        assert torch.equal(torch.get_rng_state(), generator)
        assert optimizer.state  # the warm-up stepped: the state exists, as a capture needs
        for p, q in zip(net.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q)
        both(graphed, ref_graphed, 5)
        for p, q in zip(net.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q)
            for key, value in optimizer.state[p].items():
                assert torch.equal(value, ref_optimizer.state[q][key]), key


class _Replays:
    """Stands in for a captured graph: counts replays."""

    def __init__(self) -> None:
        self.count = 0

    def replay(self) -> None:
        self.count += 1


def _captured(graphed: GraphedStep, shape: tuple[int, ...]) -> _Replays:
    """Put ``graphed`` in the state a capture with inputs of ``shape`` leaves it in."""
    graph = _Replays()
    graphed._graph, graphed._loss = graph, torch.zeros(())
    graphed._inputs = {"x": torch.zeros(shape)}
    graphed.signature = (("x", torch.Size(shape), torch.float32),)
    groups = graphed.optimizer.param_groups
    graphed._lr_values = [g["lr"] for g in groups]
    graphed._lrs = [torch.tensor(float(g["lr"])) for g in groups]
    graphed._settings = [
        [(k, v) for k, v in g.items() if k not in ("params", "lr")] for g in groups
    ]
    return graph


def test_batches_of_other_shapes_step_eagerly_and_varying_shapes_release_the_graph() -> None:
    _, _, graphed = _stepper()
    graph = _captured(graphed, (4, 3))
    # Full batches replay (their values copied in); an epoch's short last batch alone does
    # not end the graph.
    for n in [4, 4, 4, 3, 4, 4]:
        x = torch.randn(n, 3)
        out = graphed({"x": x})
        assert (out is None) == (n != 4)
        if n == 4:
            assert torch.equal(graphed._inputs["x"], x)
    assert graph.count == graphed.replays == 5
    assert graphed.other_shapes == 1
    assert graphed.failed is None
    # Batches whose shapes keep changing (jagged batches formed on the host): released.
    for n in range(5, 5 + GraphedStep.give_up_after + 5):
        assert graphed({"x": torch.zeros(n, 3)}) is None
    assert graphed.failed == "the input shapes vary from batch to batch"
    assert graphed._graph is None
    assert graphed({"x": torch.zeros(4, 3)}) is None  # eager from now on
    assert graph.count == 5


def test_a_replay_follows_the_scheduler_and_other_changes_release_the_graph() -> None:
    _, optimizer, graphed = _stepper()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _captured(graphed, (4, 3))
    optimizer.step()  # (no gradients: changes nothing)
    scheduler.step()
    assert graphed({"x": torch.zeros(4, 3)}) is not None
    # The captured learning rate now holds the scheduler's value; the group keeps a float.
    assert graphed._lrs[0].item() == pytest.approx(0.05)
    assert isinstance(optimizer.param_groups[0]["lr"], float)
    optimizer.param_groups[0]["weight_decay"] = 0.5  # fixed in the graph at capture
    assert graphed({"x": torch.zeros(4, 3)}) is None
    assert "other than the learning rate" in graphed.failed


def test_step_counts_follow_the_optimizer_flags_after_loading_a_checkpoint() -> None:
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    # A checkpoint of a graphed GPU run carries its flags; this run's optimizer keeps its own.
    for group in state["param_groups"]:
        group["capturable"] = True
    optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["capturable"] is True
    align_step_flags(optimizer)
    assert optimizer.param_groups[0]["capturable"] is False
    steps = [s["step"] for s in optimizer.state.values()]
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 for s in steps)
    optimizer.step()  # a non-capturable step accepts them


def test_training_off_cuda_runs_eagerly_with_no_graph_steps(train_cfg) -> None:
    from project.training.run import train

    assert train_cfg.model.cuda_graphs is True  # the default; the CPU switches it off
    assert train_cfg.trainer.precision == "32-true"  # best_precision on the CPU
    train(train_cfg)
    summary = json.loads((Path(train_cfg.paths.output_dir) / "metrics.json").read_text())
    assert summary["global_step"] > 0
    assert summary["cuda_graph_steps"] == 0


def test_best_precision_is_bf16_on_gpus_that_have_it() -> None:
    from project.training.run import best_precision

    assert best_precision("cpu") == "32-true"
    if not torch.cuda.is_available():
        assert best_precision("auto") == "32-true"
    elif torch.cuda.get_device_capability() >= (8, 0):
        assert best_precision("gpu") == "bf16-mixed"


def test_bookkeeping_attributes_stay_out_of_the_state_dict(train_cfg) -> None:
    import hydra

    from project.data.datamodule import SoADataModule

    dm: SoADataModule = hydra.utils.instantiate(train_cfg.data, _convert_="all")
    dm.setup("fit")
    module = hydra.utils.instantiate(train_cfg.model, contract=dm.contract.to_dict())
    keys = set(module.state_dict())
    module._loss_sum = torch.ones(())  # set directly, bypassing nn.Module's registry
    module._current_fx_name = "training_step"
    module._compiled = torch.nn.Linear(1, 1)  # a compiled model is not one of the module's parts
    assert module._current_fx_name == "training_step"
    assert torch.equal(module._loss_sum, torch.ones(()))
    assert set(module.state_dict()) == keys


def _fit(cfg, steps_per_call: int) -> tuple[dict, dict, object]:
    """Train ``cfg`` with ``steps_per_call`` optimiser steps per Lightning step; the final
    weights, optimiser state and trainer."""
    import hydra
    import lightning as L

    L.seed_everything(7)  # the same initial weights and dropout draws
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = hydra.utils.instantiate(
        cfg.model, contract=datamodule.contract.to_dict(), steps_per_call=steps_per_call
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, gradient_clip_val=0.05, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return weights, trainer.optimizers[0].state_dict(), trainer


@pytest.mark.parametrize("model", ["mlp", "deepsets"])
def test_several_optimizer_steps_per_call_equal_as_many_loop_steps(
    tmp_path: Path, model: str, fast_overrides, compose_train
) -> None:
    """K optimiser steps per Lightning step take the same steps as K Lightning steps: same
    batches (flat, and jagged for the deep sets), dropout draws, clipping and per-epoch
    scheduler, bitwise on the CPU."""
    cfg = compose_train(
        [
            *fast_overrides,
            f"model={model}",
            "data.source.n_jets=1000",
            "model.net.dropout=0.2",
            "model.scheduler.T_max=4",
        ],
        tmp_path,
    )
    one, one_state, one_trainer = _fit(cfg, 1)
    three, three_state, three_trainer = _fit(cfg, 3)
    batches = -(-700 // cfg.data.batch_size)  # training rows per epoch / batch size
    assert one_trainer.global_step == 3 * batches
    assert three_trainer.global_step == 3 * -(-batches // 3)  # loop steps of 3 batches
    assert one.keys() == three.keys()
    for name, value in one.items():
        assert torch.equal(value, three[name]), name
    assert one_state["param_groups"][0]["lr"] == three_state["param_groups"][0]["lr"]
    lr = cfg.model.optimizer.lr * (1 + math.cos(math.pi * 3 / 4)) / 2  # cosine, 3 of 4 epochs
    assert one_state["param_groups"][0]["lr"] == pytest.approx(lr)
    for key, state in one_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, three_state["state"][key][name]), name


def test_steps_per_call_is_refused_where_it_cannot_apply(
    tmp_path: Path, fast_overrides, compose_train
) -> None:
    import hydra
    import lightning as L
    from hydra.errors import InstantiationException

    cfg = compose_train([*fast_overrides, "model=mlp"], tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = hydra.utils.instantiate(
        cfg.model, contract=datamodule.contract.to_dict(), steps_per_call=4
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, accumulate_grad_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"steps_per_call=4 cannot be used here: gradients are"):
        trainer.fit(module, datamodule=datamodule)
    with pytest.raises(InstantiationException, match="steps_per_call must be auto or a whole"):
        hydra.utils.instantiate(cfg.model, contract=datamodule.contract.to_dict(), steps_per_call=0)


@pytest.mark.slow
def test_a_compiled_training_forward_trains_like_the_plain_one(
    tmp_path: Path, fast_overrides, compose_train
) -> None:
    """``model.compile=true``: the full batches run the compiled forward (the short last
    batch the plain one, no second compilation), and training ends where the plain model's
    does, within the compiler's rounding."""
    cfg = compose_train([*fast_overrides, "model=mlp", "model.net.dropout=0.0"], tmp_path)
    plain, _, _ = _fit(cfg, 1)
    with open_dict(cfg):
        cfg.model.compile = True
    compiled, _, trainer = _fit(cfg, 1)
    module = trainer.lightning_module
    assert module._compiled is not None  # no compiler failure made it fall back
    assert module._compiled_shapes[0] == torch.Size([cfg.data.batch_size])
    for name, value in plain.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)

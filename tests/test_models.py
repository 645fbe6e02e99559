"""The networks: shapes, invariance to padding and to object order, and the deployable wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from project.contract import LOG_FLOOR, Feature, InputContract, JaggedCollection
from project.models import MLP, DeepSets, ParticleTransformer
from project.soa.assembler import pad_jagged
from project.soa.deployable import DeployableModel, build_model

MAX_LENGTH = 8

NETS = {
    "mlp": {"_target_": "project.models.MLP", "hidden": [16, 16], "dropout": 0.1},
    "deepsets": {
        "_target_": "project.models.DeepSets",
        "phi_hidden": [16, 16],
        "f_hidden": [16],
        "dropout": 0.1,
    },
    "transformer": {
        "_target_": "project.models.ParticleTransformer",
        "dim": 16,
        "heads": 2,
        "layers": 2,
        "dropout": 0.1,
    },
}
SET_NETS = ["deepsets", "transformer"]


def make_contract(n_classes: int = 2) -> InputContract:
    return InputContract(
        flat=(
            Feature("pt", "log", 6.0, 0.3),
            Feature("eta", "none", 0.0, 1.1),
            Feature("m", "none", 80.0, 40.0),
        ),
        jagged=(
            JaggedCollection(
                "part",
                MAX_LENGTH,
                (
                    Feature("deta", "none", 0.0, 0.2),
                    Feature("dphi", "none", 0.0, 0.2),
                    Feature("e", "log", 2.0, 1.5),
                    Feature("dr", "none", 0.2, 0.1),
                ),
            ),
        ),
        classes=tuple(f"c{i}" for i in range(n_classes)),
    )


def build(name: str, n_classes: int = 2) -> DeployableModel:
    torch.manual_seed(0)
    return build_model(make_contract(n_classes), NETS[name]).eval()


def random_soa(seed: int, n_rows: int = 12, max_count: int = MAX_LENGTH) -> list[Tensor]:
    """Raw SoA inputs in contract order; row 0 has no objects, rows reach ``max_count``."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_count + 1, n_rows)
    counts[0] = 0
    counts[1] = max_count
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    total = int(offsets[-1])
    flat = [
        rng.uniform(300, 900, n_rows),
        rng.normal(0, 1, n_rows),
        rng.uniform(10, 200, n_rows),
    ]
    fields = [
        rng.normal(0, 0.2, total),
        rng.normal(0, 0.2, total),
        rng.exponential(20, total),
        rng.uniform(0, 0.8, total),
    ]
    return [
        *(torch.tensor(v, dtype=torch.float32) for v in flat),
        torch.from_numpy(offsets),
        *(torch.tensor(v, dtype=torch.float32) for v in fields),
    ]


def assemble(model: DeployableModel, inputs: list[Tensor]):
    with torch.no_grad():
        return model.assembler(inputs)


def logits(model: DeployableModel, flat: Tensor, padded: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        return model.net(flat, [padded], [mask])


# --- shapes and construction -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("n_classes", [2, 3])
def test_forward_shapes(name: str, n_classes: int) -> None:
    model = build(name, n_classes)
    out = model.eval()(random_soa(0))
    assert out.shape == (12, n_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    expected_type = {"mlp": MLP, "deepsets": DeepSets, "transformer": ParticleTransformer}[name]
    assert isinstance(model.net, expected_type)


def test_training_mode_backward_reaches_all_parameters() -> None:
    for name in NETS:
        model = build(name).train()
        loss = model(random_soa(1)).logsumexp(-1).sum()
        loss.backward()
        grads = [p.grad for p in model.net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_construction_errors() -> None:
    dims = make_contract().model_dims()
    with pytest.raises(ValueError, match="needs flat features"):
        MLP(**{**dims, "n_flat": 0})
    with pytest.raises(ValueError, match="collection 1"):
        DeepSets(**dims, collection=1)
    with pytest.raises(ValueError, match="collection 1"):
        ParticleTransformer(**dims, collection=1)
    with pytest.raises(ValueError, match="divisible"):
        ParticleTransformer(**dims, dim=10, heads=4)


# --- padding invariance ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NETS))
def test_more_padding_gives_same_logits(name: str) -> None:
    model = build(name)
    inputs = random_soa(2)
    flat, padded, masks = assemble(model, inputs)
    reference = logits(model, flat, padded[0], masks[0])
    # The same rows padded to 3 * MAX_LENGTH (no row is longer than MAX_LENGTH).
    wide_values, wide_mask = pad_jagged(inputs[3], inputs[4:], 3 * MAX_LENGTH)
    norm = model.assembler.jagged_norm[0]
    with torch.no_grad():
        wide = torch.where(wide_mask.unsqueeze(-1), norm(wide_values), 0.0)
    assert wide.shape == (12, 3 * MAX_LENGTH, 4)
    torch.testing.assert_close(wide[:, :MAX_LENGTH], padded[0])
    torch.testing.assert_close(logits(model, flat, wide, wide_mask), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_garbage_in_padded_slots_is_ignored(name: str) -> None:
    model = build(name)
    flat, padded, masks = assemble(model, random_soa(3))
    reference = logits(model, flat, padded[0], masks[0])
    mask = masks[0]
    assert (~mask).any()
    garbage = padded[0].clone()
    noise = torch.randn(garbage.shape, generator=torch.Generator().manual_seed(0)) * 100
    garbage[~mask] = noise[~mask]
    assert not torch.equal(garbage, padded[0])
    torch.testing.assert_close(logits(model, flat, garbage, mask), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SET_NETS)
def test_permutation_of_objects(name: str) -> None:
    model = build(name)
    flat, padded, masks = assemble(model, random_soa(4))
    reference = logits(model, flat, padded[0], masks[0])
    gen = torch.Generator().manual_seed(1)
    # A different permutation of all slots per row; the mask moves with its objects, so valid
    # objects are reordered and also interleaved with padding.
    perm = torch.stack([torch.randperm(MAX_LENGTH, generator=gen) for _ in range(len(flat))])
    shuffled = torch.gather(padded[0], 1, perm.unsqueeze(-1).expand_as(padded[0]))
    shuffled_mask = torch.gather(masks[0], 1, perm)
    assert not torch.equal(shuffled, padded[0])
    torch.testing.assert_close(
        logits(model, flat, shuffled, shuffled_mask), reference, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("name", SET_NETS)
def test_reordered_raw_objects(name: str) -> None:
    """Reversing the stored object order of every row in the raw SoA changes nothing."""
    model = build(name)
    inputs = random_soa(5)
    offsets = inputs[3]
    order = torch.cat(
        [
            torch.arange(int(offsets[i + 1]) - 1, int(offsets[i]) - 1, -1)
            for i in range(len(offsets) - 1)
        ]
    )
    reversed_inputs = [*inputs[:4], *(f[order] for f in inputs[4:])]
    with torch.no_grad():
        torch.testing.assert_close(model(reversed_inputs), model(inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_rows_without_objects_give_finite_logits(name: str) -> None:
    model = build(name)
    inputs = random_soa(6)
    with torch.no_grad():
        out = model(inputs)
        assert torch.isfinite(out[0]).all()  # row 0 has no objects
        # A batch with no objects at all (n_total == 0).
        empty = [
            *inputs[:3],
            torch.zeros(13, dtype=torch.int64),
            *(torch.zeros(0) for _ in range(4)),
        ]
        out_empty = model(empty)
    assert out_empty.shape == (12, 2)
    assert torch.isfinite(out_empty).all()
    if name != "mlp":
        assert not torch.allclose(out_empty, out)  # the objects matter for set networks


def test_row_result_independent_of_batch_neighbours() -> None:
    """A row's logits are the same alone and inside a batch (eval mode)."""
    for name in NETS:
        model = build(name)
        inputs = random_soa(7)
        with torch.no_grad():
            full = model(inputs)
            offsets = inputs[3]
            for row in (0, 1, 5):
                lo, hi = int(offsets[row]), int(offsets[row + 1])
                single = [
                    *(x[row : row + 1] for x in inputs[:3]),
                    offsets[row : row + 2] - lo,  # the row cut out
                    *(f[lo:hi] for f in inputs[4:]),
                ]
                torch.testing.assert_close(model(single), full[row : row + 1], rtol=0, atol=1e-5)
                # A view: the same row's offsets into the whole field arrays.
                view = [*single[:3], offsets[row : row + 2], *inputs[4:]]
                torch.testing.assert_close(model(view), full[row : row + 1], rtol=0, atol=1e-5)


# --- DeployableModel ------------------------------------------------------------------
def manual_assembly(contract: InputContract, inputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Standardise and pad with numpy and Python loops, independently of the assembler."""

    def std(x: np.ndarray, feat: Feature) -> np.ndarray:
        x = x.astype(np.float64)
        if feat.transform == "log":
            x = np.log(np.maximum(x, LOG_FLOOR))
        return (x - feat.mean) / feat.scale

    n_flat = len(contract.flat)
    flat = np.stack([std(inputs[i].numpy(), f) for i, f in enumerate(contract.flat)], -1)
    coll = contract.jagged[0]
    offsets = inputs[n_flat].numpy()
    fields = [std(inputs[n_flat + 1 + k].numpy(), f) for k, f in enumerate(coll.fields)]
    batch = len(offsets) - 1
    padded = np.zeros((batch, coll.max_length, len(fields)))
    mask = np.zeros((batch, coll.max_length), dtype=bool)
    for i in range(batch):
        for j in range(min(offsets[i + 1] - offsets[i], coll.max_length)):
            mask[i, j] = True
            padded[i, j] = [f[offsets[i] + j] for f in fields]
    return (
        torch.tensor(flat, dtype=torch.float32),
        torch.tensor(padded, dtype=torch.float32),
        torch.from_numpy(mask),
    )


@pytest.mark.parametrize("name", list(NETS))
def test_deployable_classifier_equals_net_on_manual_tensors(name: str) -> None:
    model = build(name)
    contract = make_contract()
    inputs = random_soa(8, n_rows=20, max_count=2 * MAX_LENGTH)  # some rows truncated
    flat, padded, mask = manual_assembly(contract, inputs)
    assert mask.sum(1).max() == MAX_LENGTH
    with torch.no_grad():
        expected = model.net(flat, [padded], [mask])
        got = model(inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The preprocessing constants travel in the state dict with the weights.
    state = model.state_dict()
    torch.testing.assert_close(
        state["assembler.flat_norm.mean"], torch.tensor([6.0, 0.0, 80.0]), rtol=0, atol=0
    )
    torch.testing.assert_close(
        state["assembler.jagged_norm.0.scale"], torch.tensor([0.2, 0.2, 1.5, 0.1]), rtol=0, atol=0
    )

"""The SoA assembler: gathers-only padding against a plain Python loop, and standardisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from project.contract import LOG_FLOOR, Feature, InputContract, JaggedCollection
from project.soa.assembler import SoAAssembler, Standardize, pad_jagged


def reference_pad(
    offsets: np.ndarray, fields: list[np.ndarray], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Padding written as the obvious loop; row ``i`` owns ``fields[offsets[i]:offsets[i+1]]``."""
    batch = len(offsets) - 1
    values = np.zeros((batch, max_length, len(fields)), dtype=np.float32)
    mask = np.zeros((batch, max_length), dtype=bool)
    for i in range(batch):
        lo, hi = offsets[i], offsets[i + 1]
        for j in range(min(hi - lo, max_length)):
            mask[i, j] = True
            for k, f in enumerate(fields):
                values[i, j, k] = f[lo + j]
    return values, mask


def random_jagged(
    rng: np.random.Generator, n_rows: int, max_count: int, n_fields: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Offsets from 0 and ``n_fields`` random field arrays; about 20% of rows are empty."""
    counts = rng.integers(0, max_count + 1, n_rows)
    counts[rng.random(n_rows) < 0.2] = 0
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    fields = [rng.normal(size=int(offsets[-1])).astype(np.float32) for _ in range(n_fields)]
    return offsets, fields


def run_pad(offsets: np.ndarray, fields: list[np.ndarray], max_length: int):
    values, mask = pad_jagged(
        torch.from_numpy(offsets), [torch.from_numpy(f) for f in fields], max_length
    )
    return values.numpy(), mask.numpy()


# --- pad_jagged ------------------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(6))
def test_pad_jagged_matches_loop(trial: int) -> None:
    rng = np.random.default_rng(trial)
    max_length = int(rng.integers(1, 9))
    n_rows = int(rng.integers(1, 40))
    # max_count above max_length: some rows are truncated, some empty
    offsets, fields = random_jagged(rng, n_rows, 2 * max_length + 2, int(rng.integers(1, 4)))
    values, mask = run_pad(offsets, fields, max_length)
    ref_values, ref_mask = reference_pad(offsets, fields, max_length)
    assert values.shape == (n_rows, max_length, len(fields))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(values, ref_values)
    counts = np.diff(offsets)
    np.testing.assert_array_equal(mask.sum(1), np.minimum(counts, max_length))


def test_pad_jagged_edge_rows() -> None:
    """An empty row, a row exactly max_length long and one longer."""
    offsets = np.array([0, 0, 3, 8, 8], dtype=np.int64)
    x = np.arange(1, 9, dtype=np.float32)
    values, mask = run_pad(offsets, [x, -x], 3)
    np.testing.assert_array_equal(mask, [[0, 0, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(values[1, :, 0], [1, 2, 3])
    np.testing.assert_array_equal(values[2, :, 0], [4, 5, 6])  # first three kept, 7 and 8 dropped
    np.testing.assert_array_equal(values[2, :, 1], [-4, -5, -6])
    assert not values[0].any()
    assert not values[3].any()


def test_pad_jagged_all_rows_empty() -> None:
    offsets = np.zeros(5, dtype=np.int64)
    fields = [np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)]
    values, mask = run_pad(offsets, fields, 4)
    assert values.shape == (4, 4, 2)
    assert not mask.any()
    assert not values.any()


@pytest.mark.parametrize("trial", range(4))
def test_pad_jagged_slice_of_larger_offsets(trial: int) -> None:
    """offsets[0] != 0: a slice of a larger offsets array with the whole field arrays (a
    framework's view of a sub-range) equals the rows cut out."""
    rng = np.random.default_rng(100 + trial)
    max_length = 5
    big_offsets, big_fields = random_jagged(rng, 50, 9, 2)
    lo = max(int(rng.integers(1, 25)), int(np.argmax(big_offsets > 0)))
    hi = int(rng.integers(lo + 1, 50))
    offsets = big_offsets[lo : hi + 1]
    assert offsets[0] > 0  # the case under test
    values, mask = run_pad(offsets, big_fields, max_length)
    ref_values, ref_mask = reference_pad(offsets, big_fields, max_length)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(values, ref_values)
    # Same as padding the whole array and keeping the slice's rows, and as the rows cut out.
    all_values, all_mask = run_pad(big_offsets, big_fields, max_length)
    np.testing.assert_array_equal(values, all_values[lo:hi])
    np.testing.assert_array_equal(mask, all_mask[lo:hi])
    cut = [f[offsets[0] : offsets[-1]] for f in big_fields]
    cut_values, cut_mask = run_pad(offsets - offsets[0], cut, max_length)
    np.testing.assert_array_equal(values, cut_values)
    np.testing.assert_array_equal(mask, cut_mask)


def test_slice_offsets_really_start_above_zero() -> None:
    offsets = np.array([0, 2, 5, 6], dtype=np.int64)[1:]  # [2, 5, 6]
    x = np.array([8, 9, 10, 11, 12, 13, 14], dtype=np.float32)  # the parent's objects
    values, mask = run_pad(offsets, [x], 4)
    np.testing.assert_array_equal(values[:, :, 0], [[10, 11, 12, 0], [13, 0, 0, 0]])
    np.testing.assert_array_equal(mask.sum(1), [3, 1])


# --- standardisation ----------------------------------------------------------------------
def contract_with(flat: bool = True, jagged: bool = True, max_length: int = 6) -> InputContract:
    return InputContract(
        flat=(Feature("a", "log", 1.5, 0.7), Feature("b", "none", -2.0, 3.0)) if flat else (),
        jagged=(
            JaggedCollection(
                "part",
                max_length,
                (Feature("e", "log", 0.5, 2.0), Feature("d", "none", 0.1, 0.25)),
            ),
        )
        if jagged
        else (),
    )


def transform(x: np.ndarray, feat: Feature) -> np.ndarray:
    x = x.astype(np.float64)
    if feat.transform == "log":
        x = np.log(np.maximum(x, LOG_FLOOR))
    return (x - feat.mean) / feat.scale


def test_standardize_matches_numpy() -> None:
    feats = (Feature("a", "log", 1.0, 2.0), Feature("b", "none", -1.0, 0.5))
    x = np.array([[3.0, 1.0], [0.0, -2.0], [-5.0, 0.0]], dtype=np.float32)
    out = Standardize(feats)(torch.from_numpy(x)).numpy()
    expected = np.stack([transform(x[:, i], f) for i, f in enumerate(feats)], axis=-1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()  # log of 0 and of negatives is clamped


def test_unfitted_standardize_is_identity() -> None:
    x = torch.randn(4, 2)
    torch.testing.assert_close(Standardize((Feature("a"), Feature("b")))(x), x)


@pytest.mark.parametrize("trial", range(3))
def test_assembler_standardises_and_zeroes_padding(trial: int) -> None:
    rng = np.random.default_rng(trial)
    contract = contract_with()
    coll = contract.jagged[0]
    n_rows = 30
    offsets, fields = random_jagged(rng, n_rows, 10, 2)
    fields[0] = np.abs(fields[0]) * 50  # energies for the log field, some exactly zero
    fields[0][::7] = 0.0
    a = rng.uniform(0, 100, n_rows).astype(np.float32)
    a[0] = 0.0
    b = rng.normal(size=n_rows).astype(np.float32)
    inputs = [torch.from_numpy(v) for v in (a, b, offsets, *fields)]
    flat, padded, masks = SoAAssembler(contract)(inputs)

    expected_flat = np.stack([transform(a, contract.flat[0]), transform(b, contract.flat[1])], -1)
    np.testing.assert_allclose(flat.numpy(), expected_flat, rtol=1e-5, atol=1e-5)

    ref_values, ref_mask = reference_pad(offsets, fields, coll.max_length)
    values, mask = padded[0].numpy(), masks[0].numpy()
    np.testing.assert_array_equal(mask, ref_mask)
    assert np.isfinite(values).all()
    assert (values[~mask] == 0.0).all()  # exactly zero, although log(0) standardised is not
    for k, feat in enumerate(coll.fields):
        np.testing.assert_allclose(
            values[..., k][mask], transform(ref_values[..., k][mask], feat), rtol=1e-5, atol=1e-5
        )


def test_assembler_all_rows_empty() -> None:
    contract = contract_with()
    offsets = torch.zeros(4, dtype=torch.int64)
    empty = torch.zeros(0)
    flat_a = torch.full((3,), 2.0)
    flat, padded, masks = SoAAssembler(contract)([flat_a, torch.ones(3), offsets, empty, empty])
    assert padded[0].shape == (3, 6, 2)
    assert not masks[0].any()
    assert (padded[0] == 0).all()
    assert flat.shape == (3, 2)


def test_flat_only_contract() -> None:
    contract = contract_with(jagged=False)
    a = torch.tensor([1.0, 10.0])
    b = torch.tensor([0.0, 3.0])
    flat, padded, masks = SoAAssembler(contract)([a, b])
    assert padded == []
    assert masks == []
    expected = np.stack(
        [transform(a.numpy(), contract.flat[0]), transform(b.numpy(), contract.flat[1])], -1
    )
    np.testing.assert_allclose(flat.numpy(), expected, rtol=1e-6)


def test_jagged_only_contract() -> None:
    contract = contract_with(flat=False, max_length=3)
    offsets = torch.tensor([0, 2, 2, 6], dtype=torch.int64)
    e = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    d = -e
    flat, padded, masks = SoAAssembler(contract)([offsets, e, d])
    assert flat.shape == (3, 0)
    assert flat.dtype == torch.float32
    assert padded[0].shape == (3, 3, 2)
    np.testing.assert_array_equal(masks[0].numpy(), [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    feat = contract.jagged[0].fields[0]
    np.testing.assert_allclose(
        padded[0][2, :, 0].numpy(), transform(np.array([3.0, 4.0, 5.0]), feat), rtol=1e-6
    )
    assert (padded[0][1] == 0).all()


def test_two_collections_follow_input_names_order() -> None:
    contract = InputContract(
        flat=(Feature("f"),),
        jagged=(
            JaggedCollection("p", 2, (Feature("x"),)),
            JaggedCollection("q", 3, (Feature("y"), Feature("z"))),
        ),
    )
    inputs = {
        "f": torch.tensor([1.0, 2.0]),
        "p_offsets": torch.tensor([0, 1, 3]),
        "p_x": torch.tensor([10.0, 20.0, 30.0]),
        "q_offsets": torch.tensor([0, 0, 1]),
        "q_y": torch.tensor([5.0]),
        "q_z": torch.tensor([6.0]),
    }
    _flat, padded, masks = SoAAssembler(contract)([inputs[n] for n in contract.input_names])
    assert [p.shape for p in padded] == [(2, 2, 1), (2, 3, 2)]
    np.testing.assert_array_equal(padded[0][..., 0].numpy(), [[10, 0], [20, 30]])
    np.testing.assert_array_equal(padded[1][1, 0].numpy(), [5, 6])
    np.testing.assert_array_equal(masks[1].numpy(), [[0, 0, 0], [1, 0, 0]])

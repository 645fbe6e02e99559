"""Event weights end to end: the weighted loss, weighted metrics, bad weights, and a weighted,
reweighted training run whose logged AUC is the weighted AUC of its test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC

from project.contract import ContractError, Feature, InputContract, Target
from project.data.batching import LABEL, TARGETS, WEIGHT, SoATensors
from project.data.datamodule import SoADataModule
from project.data.sources.toy import ToyJetSource
from project.training.metrics import (
    WeightedAccuracy,
    WeightedAUROC,
    weighted_auc,
    weighted_quantile,
)
from project.training.module import ClassifierModule, loss_terms

WEIGHT_EXPR = "gen_weight * xsec"


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _huber(d: np.ndarray) -> np.ndarray:
    a = np.abs(d)
    return np.where(a < 1.0, 0.5 * d**2, a - 0.5)


def test_weighted_loss_equals_a_hand_computation_with_negative_weights() -> None:
    contract = InputContract(
        flat=(Feature("x"),),
        classes=("a", "b", "c"),
        regression=(Target("m", loss="huber", loss_weight=0.5, mean=100.0, scale=20.0),),
        class_loss_weight=2.0,
    )
    head = torch.tensor(
        [[0.2, -1.0, 0.5, 0.3], [1.5, 0.1, -0.3, -2.0], [-0.7, 0.9, 0.0, 1.1], [0.0, 0.0, 2.0, 0.4]]
    )
    labels = torch.tensor([0, 1, 1, 2])
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25])  # one negative (NLO)
    truth = torch.tensor([[110.0], [60.0], [130.0], [95.0]])
    batch = {LABEL: labels, WEIGHT: weights, TARGETS: truth}
    terms = loss_terms(head, batch, contract, torch.tensor([100.0]), torch.tensor([20.0]))

    h, y, w = head.numpy().astype(np.float64), labels.numpy(), weights.numpy().astype(np.float64)
    ce = -np.log(_softmax(h[:, :3])[np.arange(4), y])
    class_loss = np.sum(w * ce) / np.sum(w)
    reg = _huber(h[:, 3] - (truth.numpy()[:, 0] - 100.0) / 20.0)
    reg_loss = np.sum(w * reg) / np.sum(w)
    assert terms["class"].item() == pytest.approx(class_loss, rel=1e-6)
    assert terms["m"].item() == pytest.approx(reg_loss, rel=1e-6)
    assert terms["total"].item() == pytest.approx(2.0 * class_loss + 0.5 * reg_loss, rel=1e-6)
    # Not the unweighted mean: the weights matter.
    assert abs(terms["class"].item() - ce.mean()) > 0.05
    # Without weights: the plain mean.
    plain = loss_terms(
        head, {LABEL: labels, TARGETS: truth}, contract, torch.tensor([100.0]), torch.tensor([20.0])
    )
    assert plain["class"].item() == pytest.approx(ce.mean(), rel=1e-6)


@pytest.fixture(scope="module")
def jets_contract(repo_root: Path) -> dict:
    d = OmegaConf.to_container(OmegaConf.load(repo_root / "configs/data/contract/jets.yaml"))
    d["jagged"] = []
    return d


def test_training_batch_carries_the_weight_expression(jets_contract) -> None:
    """A training batch's weights are gen_weight * xsec of its rows (negative ones among
    them), and the module's loss on it is the weighted mean of its per-row cross-entropy."""
    source = ToyJetSource(n_jets=400, seed=1)
    dm = SoADataModule(source, jets_contract, weight=WEIGHT_EXPR)
    dm.setup()
    train = dm.splits["train"]
    tensors = SoATensors(train, dm.contract)
    rows = torch.arange(64)
    batch = tensors.batch(rows)
    entries = train.ids["entry"][:64]
    expected = source.table["gen_weight"][entries] * source.table["xsec"][entries]
    np.testing.assert_allclose(batch[WEIGHT].numpy(), expected, rtol=1e-6)
    assert (batch[WEIGHT] < 0).any()
    net = {"_target_": "project.models.MLP", "hidden": [16]}
    module = ClassifierModule(net, dm.contract.to_dict(), optimizer={})
    with torch.no_grad():
        head = module(batch)
        loss = loss_terms(
            head, batch, dm.contract, module.model.target_mean, module.model.target_scale
        )
    ce = -np.log(_softmax(head.numpy().astype(np.float64))[np.arange(64), batch[LABEL].numpy()])
    assert loss["total"].item() == pytest.approx(np.sum(expected * ce) / np.sum(expected), rel=1e-5)


# --- weighted metrics --------------------------------------------------------------------


def _sample(n: int = 400, seed: int = 0, classes: int = 2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes)) + 1.5 * np.eye(classes)[labels]
    probs = _softmax(np.round(logits, 1))  # rounded: ties occur
    weights = np.where(rng.random(n) < 0.1, -1.0, 1.0) * rng.uniform(0.2, 3.0, n)
    return probs, labels, weights


def _pairwise_auc(scores, positive, weights) -> float:
    """The weighted rank statistic by brute force over all signal-background pairs."""
    sp, sb = scores[positive], scores[~positive]
    wp, wb = weights[positive], weights[~positive]
    above = (sp[:, None] > sb[None, :]) + 0.5 * (sp[:, None] == sb[None, :])
    return float((wp[:, None] * wb[None, :] * above).sum() / (wp.sum() * wb.sum()))


def _update_in_batches(metric, probs, labels, weights, size: int = 97):
    for start in range(0, len(labels), size):
        s = slice(start, start + size)
        batch = {LABEL: torch.from_numpy(labels[s])}
        if weights is not None:
            batch[WEIGHT] = torch.from_numpy(weights[s].astype(np.float32))
        metric.update(torch.from_numpy(probs[s].astype(np.float32)), batch)
    return metric.compute().item()


def test_weighted_auroc_is_the_weighted_rank_statistic() -> None:
    probs, labels, weights = _sample()
    scores = probs[:, 1].astype(np.float32).astype(np.float64)
    expected = _pairwise_auc(scores, labels == 1, weights.astype(np.float32))
    assert weighted_auc(scores, labels == 1, weights) == pytest.approx(expected, rel=1e-6)
    got = _update_in_batches(WeightedAUROC(2), probs, labels, weights)
    assert got == pytest.approx(expected, rel=1e-5)
    # The negative weights change it: this is not the unweighted AUC.
    assert abs(got - _pairwise_auc(scores, labels == 1, np.ones_like(weights))) > 1e-3


def test_unit_weights_give_torchmetrics_auroc() -> None:
    probs, labels, _ = _sample(seed=1)
    ours = _update_in_batches(WeightedAUROC(2), probs, labels, None)
    theirs = BinaryAUROC()(torch.from_numpy(probs[:, 1]).float(), torch.from_numpy(labels)).item()
    assert ours == pytest.approx(theirs, abs=1e-6)
    probs3, labels3, _ = _sample(seed=2, classes=3)
    ours3 = _update_in_batches(WeightedAUROC(3), probs3, labels3, None)
    theirs3 = MulticlassAUROC(num_classes=3, average="macro")(
        torch.from_numpy(probs3).float(), torch.from_numpy(labels3)
    ).item()
    assert ours3 == pytest.approx(theirs3, abs=1e-6)


def test_weighted_accuracy() -> None:
    probs, labels, weights = _sample(classes=3)
    correct = probs.argmax(1) == labels
    expected = np.sum(weights * correct) / np.sum(weights)
    assert _update_in_batches(WeightedAccuracy(3), probs, labels, weights) == pytest.approx(
        expected, rel=1e-5
    )
    probs2, labels2, weights2 = _sample(seed=3)
    expected2 = np.sum(weights2 * ((probs2[:, 1] >= 0.5) == labels2)) / np.sum(weights2)
    assert _update_in_batches(WeightedAccuracy(2), probs2, labels2, weights2) == pytest.approx(
        expected2, rel=1e-5
    )


def test_weighted_quantile() -> None:
    values = np.array([3.0, 1.0, 2.0, 4.0])
    assert weighted_quantile(values, np.array([1.0, 1.0, 1.0, 1.0]), 0.5)[0] == 2.0
    # Weight 5 on the value 4 moves the median there; a negative weight counts against.
    assert weighted_quantile(values, np.array([1.0, 1.0, 1.0, 5.0]), 0.5)[0] == 4.0
    assert weighted_quantile(values, np.array([1.0, 3.0, -1.0, 1.0]), 0.5)[0] == 1.0


# --- bad weights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "found"),
    [
        ("gen_weight * sqrt(jet_eta)", r"weight has \d+ NaN and 0 Inf values"),
        ("gen_weight / (jet_pt - jet_pt)", r"weight has 0 NaN and \d+ Inf values"),
    ],
)
def test_non_finite_weights_are_an_error(jets_contract, weight: str, found: str) -> None:
    dm = SoADataModule(ToyJetSource(n_jets=200), jets_contract, weight=weight)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(
            ContractError, match=rf"toy jets \(n_jets=200, seed=0\) \(entries 0-200\): {found}"
        ),
    ):
        dm.setup()


@pytest.mark.parametrize(
    "weight", ["where(label == 1, 0.0, 1.0)", "where(label == 1, -gen_weight, 1.0)"]
)
def test_class_without_positive_total_weight_is_an_error(jets_contract, weight: str) -> None:
    dm = SoADataModule(ToyJetSource(n_jets=200), jets_contract, weight=weight)
    with pytest.raises(
        ContractError,
        match=r"class 'top' has total weight -?[\d.]+ after the selection \(\d+ rows\)",
    ):
        dm.setup()


# --- a weighted, reweighted run ----------------------------------------------------------


@pytest.fixture(scope="module")
def weighted_run(compose_train, fast_overrides, tmp_path_factory):
    from project.training.run import train

    tmp = tmp_path_factory.mktemp("weighted")
    cfg = compose_train(
        [
            *fast_overrides,
            "experiment=toy_weighted",
            "trainer.max_epochs=2",
            "data.source.n_jets=1500",
            # Few, weak features: an AUC short of 1, where the weights make a difference.
            "data.contract.flat=[{name: jet_pt}, {name: jet_eta}, {name: jet_tau2}]",
        ],
        tmp,
    )
    metrics = train(cfg)
    return cfg, Path(cfg.paths.output_dir), metrics


def test_weighted_run_logs_the_weighted_auc_of_its_test_split(weighted_run) -> None:
    from hydra.utils import instantiate

    cfg, run_dir, metrics = weighted_run
    summary = json.loads((run_dir / "metrics.json").read_text())
    checkpoint = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    module = ClassifierModule(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    test = datamodule.splits["test"]
    batch = SoATensors(test, datamodule.contract).batch(torch.arange(len(test)))
    with torch.no_grad():
        probs = torch.stack(module.model.outputs(module(batch)), 1).numpy()
    # The test split keeps the event weights (reweighting multiplies train and val only).
    entries = test.ids["entry"]
    source = datamodule.source
    weights = source.table["gen_weight"][entries] * source.table["xsec"][entries]
    np.testing.assert_allclose(test.weights, weights, rtol=1e-6)
    expected = weighted_auc(probs[:, 1], test.labels == 1, test.weights)
    assert metrics["test/auroc"] == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(weighted_auc(probs[:, 1], test.labels == 1), abs=1e-6)
    accuracy = np.sum(test.weights * ((probs[:, 1] >= 0.5) == test.labels)) / np.sum(test.weights)
    assert metrics["test/accuracy"] == pytest.approx(accuracy, abs=1e-5)


def test_weighted_run_stores_the_reweighting(weighted_run) -> None:
    _, run_dir, _ = weighted_run
    stored = json.loads((run_dir / "reweighting.json").read_text())
    assert stored["variables"] == ["jet_pt", "jet_eta"]
    assert np.asarray(stored["weights"]["qcd"]).shape == (10, 8)
    summary = json.loads((run_dir / "metrics.json").read_text())
    checkpoint = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["reweighting"] == stored
    for name in ("reweighting", "roc", "scores", "efficiency_vs_pt"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

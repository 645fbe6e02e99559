"""The deploy graph: raw SoA columns in, one tensor per output name out (class probabilities,
regression targets in physical units)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from project.contract import ContractError, InputContract
from project.soa.checkpoint import CheckpointError, read_checkpoint
from project.soa.deployable import DeployableModel, build_model
from project.utils.importing import UntrustedTargetError, allowed_targets


class DeployGraph(nn.Module):
    """The deployable model with the contract's input signature and named outputs.

    ``forward(*inputs)`` takes the inputs positionally in ``contract.input_names`` order (flat
    columns ``(batch,)``; per collection ``offsets`` ``(batch + 1,)`` int64 and fields
    ``(n_total,)``) and returns one ``(batch,)`` tensor per ``contract.outputs``.
    """

    def __init__(self, model: DeployableModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """The outputs, each ``(batch,)``."""
        return tuple(self.model.outputs(self.model(list(inputs))))


@dataclass
class LoadedCheckpoint:
    """A checkpoint's deploy graph and what describes it."""

    graph: DeployGraph
    contract: InputContract
    net_config: dict[str, Any]
    path: Path
    sha256: str


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> LoadedCheckpoint:
    """Rebuild the deploy graph from a training checkpoint, loaded with ``weights_only=True``.

    Parameters
    ----------
    path
        A ``.ckpt`` written by the training run.
    expected_sha256
        The hash recorded when the checkpoint was saved; a mismatch means the file changed
        since and raises ``CheckpointError``.
    """
    path = Path(path)
    ckpt, digest = read_checkpoint(path, expected_sha256)
    hparams = ckpt["hyper_parameters"]
    try:
        contract = InputContract.from_dict(hparams["contract"])
        # The target is checked against the allowlist before anything is imported.
        model = build_model(contract, hparams["net"], allowed_targets())
    except (UntrustedTargetError, ContractError) as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    except (ImportError, KeyError, TypeError) as err:  # a network of another code version
        raise CheckpointError(
            f"checkpoint {path}: cannot build its network {hparams['net'].get('_target_')!r} "
            f"from model.net {hparams['net']}: {err}"
        ) from err
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} has no state_dict: it holds no weights")
    state = model_state(ckpt["state_dict"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the network {hparams['net'].get('_target_')}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    graph = DeployGraph(model.eval()).eval()
    return LoadedCheckpoint(graph, contract, dict(hparams["net"]), path, digest)


def model_state(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The deployable model's weights from a training checkpoint's ``state_dict``: the keys
    under ``model.``, without that prefix."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

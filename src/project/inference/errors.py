"""Errors of the inference runtime: each names what is wrong and what to do about it."""

from project.contract import ContractError


class InputError(ContractError):
    """Inputs that do not satisfy the model's contract (a missing column, a dtype that cannot be
    cast safely, inconsistent lengths, bad offsets or counts, NaN or Inf): never a silently
    wrong answer. A ``ContractError`` (and so a ``ValueError``): callers may catch either."""


class ArtifactError(RuntimeError):
    """An export directory or artifact that cannot be used."""


class MissingManifestError(ArtifactError, FileNotFoundError):
    """The export directory has no ``manifest.json`` (not an export, or an unfinished one)."""


class IntegrityError(ArtifactError):
    """A file whose sha256 differs from its record: modified or replaced since export."""


class ParityFailedError(ArtifactError):
    """The artifact failed its parity check against the eager graph at export time, or does
    not reproduce its golden outputs on this machine."""

"""Checks on what a new analysis is called: its package, its distribution and its author.

Standard library only: ``scripts/new_analysis.py`` runs before any environment exists.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import sys
from dataclasses import dataclass

from tools.new_analysis.errors import ForkError

TEMPLATE_PACKAGE = "project"
TEMPLATE_DISTRIBUTION = "hep-ml-template"

# Import names of the template's dependencies (and of the tools around them): a package with
# one of these names would shadow the dependency for every import in the new project.
DEPENDENCY_IMPORT_NAMES = frozenset(
    {
        "awkward",
        "awkward_cpp",
        "fastjet",
        "hydra",
        "lightning",
        "lightning_fabric",
        "lightning_utilities",
        "matplotlib",
        "numpy",
        "omegaconf",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "pyarrow",
        "pytest",
        "pythia8",
        "pythia8mc",
        "pytorch_lightning",
        "rich",
        "ruff",
        "setuptools",
        "tensorboard",
        "torch",
        "torchmetrics",
        "torchvision",
        "tqdm",
        "uproot",
        "pip",
        "wheel",
    }
)
# Top-level folders of the repository: a package of that name would be shadowed by (or
# shadow) the folder when tests run from the repository root.
REPOSITORY_FOLDERS = frozenset(
    {"configs", "cpp", "data", "docs", "exported", "logs", "scripts", "src", "tests", "tools"}
)

_DIST_RE = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
_ASCII_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AUTHOR_RE = re.compile(r"^\s*(?P<name>[^<>]+?)\s*(?:<(?P<email>[^<>\s]+@[^<>\s]+)>)?\s*$")


def check_package(name: str) -> list[str]:
    """Validate the import package name of the new analysis; return warnings.

    Raises ``ForkError`` if ``name`` is not an ASCII Python identifier, is a keyword, is the
    template's own ``project``, names a dependency, a standard-library module, a repository
    folder, or anything already importable here.
    """
    if not name:
        raise ForkError("the package name is empty; give one such as 'tthml'")
    if not _ASCII_IDENTIFIER.match(name):
        raise ForkError(
            f"package name {name!r} is not a Python identifier: use ASCII letters, digits and "
            "'_', not starting with a digit (for example 'tth_ml')"
        )
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise ForkError(f"package name {name!r} is a Python keyword; choose another")
    if name == TEMPLATE_PACKAGE:
        raise ForkError(
            f"package name {name!r} is the template's own package; the new analysis needs a "
            "name of its own"
        )
    if name.lower() in DEPENDENCY_IMPORT_NAMES:
        raise ForkError(
            f"package name {name!r} would shadow the dependency {name.lower()!r}: every "
            f"'import {name}' would then find the wrong package. Choose another name."
        )
    if name in sys.stdlib_module_names:
        raise ForkError(f"package name {name!r} shadows the standard-library module {name!r}")
    if name in REPOSITORY_FOLDERS:
        raise ForkError(
            f"package name {name!r} is a folder of the repository ({name}/); choose another"
        )
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        where = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
        raise ForkError(
            f"package name {name!r} is already importable here (from {where}); two packages "
            "of one name cannot be installed side by side. Choose another name."
        )
    warnings = []
    if name != name.lower():
        warnings.append(f"package name {name!r} is not lowercase; PEP 8 recommends lowercase")
    return warnings


def normalize_distribution(name: str) -> str:
    """PEP 503 normal form: lowercase, runs of ``-_.`` become one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_from_title(title: str) -> str:
    """A distribution name derived from the analysis name: ``"ttH classifier"`` gives
    ``"tth-classifier"``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def check_distribution(name: str) -> str:
    """Validate a distribution (``pip install``) name per PEP 508; return its normal form."""
    if not _DIST_RE.match(name or ""):
        raise ForkError(
            f"distribution name {name!r} is not valid (PEP 508): use letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit (for example 'tth-classifier')"
        )
    normal = normalize_distribution(name)
    if normal == TEMPLATE_DISTRIBUTION:
        raise ForkError(
            f"distribution name {name!r} is the template's own; the new analysis needs its own"
        )
    if normal.replace("-", "_") in DEPENDENCY_IMPORT_NAMES or normal in {
        "pytorch-lightning",
        "hydra-core",
    }:
        raise ForkError(f"distribution name {name!r} is the name of a dependency; choose another")
    return normal


def check_title(title: str) -> str:
    """The human-readable analysis name: one non-empty line."""
    title = (title or "").strip()
    if not title:
        raise ForkError("the analysis name is empty; give one such as 'ttH classifier'")
    if "\n" in title or not title.isprintable():
        raise ForkError(f"the analysis name {title!r} must be one line of printable text")
    if not distribution_from_title(title):
        raise ForkError(
            f"the analysis name {title!r} has no letters or digits to derive a distribution "
            "name from; give --dist-name"
        )
    return title


@dataclass(frozen=True)
class Author:
    """Who the new project and its first commit belong to."""

    name: str
    email: str

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


def parse_author(text: str) -> Author:
    """Parse ``"A. Physicist <a@example.org>"``; git needs both a name and an email."""
    match = _AUTHOR_RE.match(text or "")
    if not match or not match.group("email") or not match.group("name").strip():
        raise ForkError(
            f"author {text!r} must look like 'A. Physicist <a.physicist@example.org>' (the name "
            "and email of the first commit and of pyproject.toml)"
        )
    if '"' in match.group("name") or "\\" in match.group("name"):
        raise ForkError(f"author name {match.group('name')!r} must not contain quotes or '\\'")
    return Author(match.group("name").strip(), match.group("email"))

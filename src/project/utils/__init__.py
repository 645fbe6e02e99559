"""Small shared utilities, importable by every layer (standard library only at import)."""

from project.utils.files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    follow_umask,
    sha256_file,
)
from project.utils.importing import build_from_config

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_from_config",
    "follow_umask",
    "sha256_file",
]

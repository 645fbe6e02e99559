"""Small shared utilities (standard library only, so any layer may import them)."""

from project.utils.files import atomic_write_text, sha256_file
from project.utils.importing import build_from_config

__all__ = ["atomic_write_text", "build_from_config", "sha256_file"]

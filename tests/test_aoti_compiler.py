"""The compiler of AOTInductor packages links libstdc++ as a shared library.

A toolchain with only a static ``libstdc++.a`` puts a private libstdc++ into the package's
``wrapper.so``; loaded beside libtorch's, the two copies crash ``std::regex`` on load. The
export picks a compiler that links the shared one.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from project.deploy.formats import aoti_compiler, links_shared_libstdcxx


def _static_only_compiler(directory: Path) -> Path:
    """A compiler front end that, like such a toolchain, finds no ``libstdc++.so``."""
    script = directory / "static-g++"
    script.write_text('#!/bin/sh\ncase "$1" in -print-file-name=*) echo "${1#*=}";; esac\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (the export's compiler)")
def test_a_compiler_with_only_a_static_libstdcxx_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    static = _static_only_compiler(tmp_path)
    assert not links_shared_libstdcxx(str(static))
    assert links_shared_libstdcxx(shutil.which("g++"))
    monkeypatch.setenv("CXX", str(static))
    chosen = aoti_compiler("auto")
    assert chosen != str(static)
    assert links_shared_libstdcxx(chosen)
    assert aoti_compiler(str(static)) == str(static)  # an explicit choice is kept


def test_the_export_records_the_compiler(exported) -> None:
    import json

    manifest = json.loads((exported("mlp") / "manifest.json").read_text())
    aoti = next(a for a in manifest["artifacts"] if a["format"] == "aoti")
    assert links_shared_libstdcxx(aoti["cxx"])

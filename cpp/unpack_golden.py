"""Unpack an export's golden.npz into raw arrays the C++ replay program reads.

    python cpp/unpack_golden.py EXPORT_DIR OUT_DIR

golden.npz is numpy's zip of .npy files. Rather than parse that container in C++, this writes
each array as raw little-endian bytes (``<name>.bin``) plus ``index.json`` with its dtype and
shape, after checking golden.npz against the manifest's sha256. Needs numpy only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

DTYPES = {"float32": "<f4", "int64": "<i8"}


def unpack(export_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir/index.json`` and one ``.bin`` per golden array; return ``out_dir``."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    golden = export_dir / manifest["golden"]["file"]
    digest = hashlib.sha256(golden.read_bytes()).hexdigest()
    if digest != manifest["golden"]["sha256"]:
        raise ValueError(f"{golden}: sha256 {digest} is not the manifest's")
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    with np.load(golden) as npz:
        for name in npz.files:
            a = npz[name]
            if a.dtype.name not in DTYPES:
                continue
            np.ascontiguousarray(a, dtype=DTYPES[a.dtype.name]).tofile(out_dir / f"{name}.bin")
            arrays[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "file": f"{name}.bin"}
    index = {"rows": manifest["golden"]["rows"], "arrays": arrays}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    unpack(Path(sys.argv[1]), Path(sys.argv[2]))

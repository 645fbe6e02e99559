"""Child process of the parity check: load one artifact, run every case, save the outputs.

``python -m project.deploy._parity_worker FORMAT ARTIFACT DEVICE CASES.npz OUT_DIR [OPTIMIZATION]``

Running in a fresh process proves the artifact loads without the exporting process's state,
and a crash while loading compiled code (seen with AOTInductor on some torch builds) kills
only this process; the parent reports it as that format failing. The runtime's backends load
TorchScript, AOTInductor and ONNX; the saved ``torch.export`` program (``exported_program``)
is loaded back here with ``torch.export.load`` and run as its module.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


class ProgramBackend:
    """A saved ``torch.export`` program, loaded with ``torch.export.load`` and run eagerly."""

    def __init__(self, path: str | Path) -> None:
        program = torch.export.load(str(path))
        # check_guards=False: torch 2.14's generated guard checks the range of ``batch + 1``
        # (offsets, >= 2) against ``batch`` itself and refuses batch 1 ("Guard failed:
        # -1 + off.size()[0] >= 2"); the input checks that remain (a pre-hook) are correct.
        # torch releases without the argument have no such guard.
        try:
            self.module = program.module(check_guards=False)
        except TypeError:
            self.module = program.module()

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run on tensors in graph order; the outputs in the contract's order."""
        with torch.inference_mode():
            return list(self.module(*inputs))


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    fmt, artifact, device, cases_file, out_dir = argv[:5]
    optimization = argv[5] if len(argv) > 5 else "all"
    from project.inference.backends import open_backend
    from project.inference.threads import ThreadPolicy, apply_torch_policy

    apply_torch_policy(ThreadPolicy.single())
    out = Path(out_dir)
    started = time.perf_counter()
    if fmt == "exported_program":
        backend = ProgramBackend(artifact)
    else:
        backend = open_backend(fmt, artifact, device, onnx_optimization=optimization)
    load_seconds = time.perf_counter() - started

    with np.load(cases_file) as data:
        keys = list(data.keys())
        cases: dict[str, list[tuple[int, np.ndarray]]] = {}
        for key in keys:
            case, index = key.rsplit("::", 1)
            cases.setdefault(case, []).append((int(index), data[key]))
    outputs: dict[str, np.ndarray] = {}
    run_seconds = 0.0
    for case, arrays in cases.items():
        inputs = [torch.from_numpy(a).to(device) for _, a in sorted(arrays, key=lambda p: p[0])]
        t0 = time.perf_counter()
        results = backend(inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        run_seconds += time.perf_counter() - t0
        for j, r in enumerate(results):
            outputs[f"{case}::{j}"] = r.detach().float().cpu().numpy()
    np.savez(out / "outputs.npz", **outputs)
    (out / "result.json").write_text(
        json.dumps({"load_seconds": load_seconds, "run_seconds": run_seconds})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

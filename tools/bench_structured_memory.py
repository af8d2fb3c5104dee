"""Peak memory of a structured prune, as a ratio to the model's size on disk.

    python tools/export_lm.py --workdir /tmp/onnxprune-lm           # SmolLM2-135M
    python tools/bench_structured_memory.py [MODEL ...] [--external-copy DIR]
        [--structure ffn,heads] [--sparsity 0.5]

For each model (default: /tmp/onnxprune-lm/smollm2-135m.onnx), `onnxprune prune MODEL -o
OUT --structure S --sparsity F` runs in a child process, started from a small launcher so
that the child's ``ru_maxrss`` (from ``wait4``) is its own peak resident set and not this
process's (exec keeps the parent's high-water mark). With `--external-copy DIR` the model
is also measured saved with external data (converted once into DIR with
``onnx.save(..., save_as_external_data=True)``).

Printed per model: its bytes on disk (model file plus external data), the prune's peak
RSS, their ratio, and the peak of the same interpreter importing what the prune imports
(onnxprune, onnx, numpy; the floor no prune goes under). The issue asks for about one
group plus the model's graph above that floor, not the whole model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
DEFAULT_MODEL = Path("/tmp/onnxprune-lm/smollm2-135m.onnx")

# A child's ru_maxrss includes the RSS of the process that exec'd it: start the command
# from this small launcher, not from a process that has imported onnx.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""
FLOOR = "import onnx, numpy, onnxprune.api, onnxprune.structured.run, onnxprune.cli.commands"


def peak_rss(command: list[str]) -> tuple[int, int]:
    """(exit status, peak resident set in bytes) of `command` run in a child process."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
    status, kilobytes = done.stdout.split()
    return int(status), int(kilobytes) * 1024  # ru_maxrss is in kilobytes on Linux


def external_copy(model: Path, directory: Path) -> Path:
    """`model` saved with external data into `directory` (made once, reused after)."""
    import onnx

    copy = directory / f"{model.stem}-external.onnx"
    if not copy.exists():
        directory.mkdir(parents=True, exist_ok=True)
        proto = onnx.load(str(model))
        onnx.save(proto, str(copy), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=copy.name + ".data", size_threshold=1024)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", type=Path, default=[DEFAULT_MODEL])
    parser.add_argument("--external-copy", type=Path, metavar="DIR",
                        help="also measure each model saved with external data, in DIR")
    parser.add_argument("--structure", default="ffn,heads")
    parser.add_argument("--sparsity", default="0.5")
    args = parser.parse_args()
    from onnxprune.io import model_file_bytes

    models = [path for path in args.models if path.exists()]
    for path in args.models:
        if not path.exists():
            print(f"{path}: missing (skipped)")
    if args.external_copy:
        models += [external_copy(path, args.external_copy) for path in list(models)]
    _, floor = peak_rss([sys.executable, "-c", FLOOR])
    print(f"interpreter floor ({FLOOR.split(' ', 1)[1]}): {floor / MiB:.0f} MiB")
    print("| model | on disk MiB | peak RSS MiB | peak / size | (peak - floor) / size |")
    print("|---|---:|---:|---:|---:|")
    for model in models:
        with tempfile.TemporaryDirectory(dir=model.parent) as scratch:
            out = Path(scratch) / "pruned.onnx"
            command = [sys.executable, "-m", "onnxprune", "prune", str(model), "-o", str(out),
                       "-q", "--structure", args.structure, "--sparsity", args.sparsity]
            status, peak = peak_rss(command)
            size = model_file_bytes(model)
            if status:
                print(f"| {model.name} | {size / MiB:.0f} | failed (exit {status}) | | |")
                continue
            print(f"| {model.name} | {size / MiB:.0f} | {peak / MiB:.0f} | {peak / size:.2f} "
                  f"| {(peak - floor) / size:.2f} |")


if __name__ == "__main__":
    main()

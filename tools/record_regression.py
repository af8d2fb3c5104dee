"""Record the regression matrix: the outputs of today's code, for tests/test_regression.py.

    python tools/record_regression.py                  # full matrix into tests/fixtures/regression
    python tools/record_regression.py --out DIR        # somewhere else (e.g. to compare two runs)
    python tools/record_regression.py --subset default # only the cases the default test runs

Writes `hashes.json` (case key "model|method|setting|format" -> {"sha256": ...} or
{"refused": "..."}; calibrated runs add their per-target reconstruction errors) and
`masks.npz` (the packed zero mask of every target of each calibrated dense run, keyed
"model|method|setting|target"), plus the calibration inputs `calib/<model>.npz`. Files whose
content has not changed are left untouched. Needs the real-model wheels (see tests/conftest.py).
The cases are defined in tests/regression_cases.py.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402
import regression_cases as rc  # noqa: E402
from conftest import example_feeds  # noqa: E402


def _check_float64_model(path: Path) -> None:
    """The float64 mlp must run in onnxruntime and give float64 outputs."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, example_feeds(path))
    if not all(o.dtype == np.float64 and np.isfinite(o).all() for o in outputs):
        raise SystemExit(f"{path}: float64 model gave {[o.dtype for o in outputs]} outputs")


def _write_npz_if_changed(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    if path.is_file():
        with np.load(path) as stored:
            if set(stored.files) == set(arrays) and all(
                    np.array_equal(stored[k], arrays[k]) for k in arrays):
                return False
    buffer = io.BytesIO()
    np.savez(buffer, **dict(sorted(arrays.items())))
    path.write_bytes(buffer.getvalue())
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=rc.FIXTURE_DIR,
                        help="folder for hashes.json and masks.npz [%(default)s]")
    parser.add_argument("--subset", choices=("full", "default"), default="full")
    parser.add_argument("--match", metavar="REGEX",
                        help="only the cases whose key matches (for a look, not for the fixture)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the runs' warnings are expected, keep it quiet

    cases = rc.all_cases() if args.subset == "full" else rc.default_cases()
    if args.match:
        cases = [case for case in cases if re.search(args.match, case.key)]
    args.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    masks: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = Path(scratch)
        paths = {}
        for name in rc.MODELS:
            try:
                paths[name] = rc.model_path(name, work_dir)
            except pytest.skip.Exception as exc:
                raise SystemExit(f"cannot record without every model: {exc}") from None
            if rc.write_calibration(name, paths[name]):
                print(f"wrote {rc.calibration_path(name)}")
        _check_float64_model(paths[rc.FLOAT64_MODEL])
        for number, case in enumerate(cases, 1):
            case_started = time.perf_counter()
            result = rc.run_case(case, paths[case.model], work_dir)
            records[case.key] = result.record
            for target, packed in result.masks.items():
                masks[case.mask_key(target)] = packed
            outcome = "refused" if "refused" in result.record else result.record["sha256"][:12]
            print(f"[{number}/{len(cases)}] {case.key}: {outcome} "
                  f"({time.perf_counter() - case_started:.2f} s)", flush=True)
    elapsed = time.perf_counter() - started

    hashes_file = args.out / rc.HASHES_FILE.name
    hashes_file.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    wrote_masks = _write_npz_if_changed(args.out / rc.MASKS_FILE.name, masks)
    print(f"{len(cases)} cases ({sum('refused' in r for r in records.values())} refused) in "
          f"{elapsed:.1f} s; wrote {hashes_file}"
          + (f" and {args.out / rc.MASKS_FILE.name}" if wrote_masks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

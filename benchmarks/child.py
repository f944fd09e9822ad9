"""Child entry point: ``python -m benchmarks.child SCENARIO PEER PARAMS_JSON``.

Runs one scenario's ``measure(peer, params)`` in this fresh process and hands the result to the
parent (harness.emit). An exception becomes ``{"error": ...}`` so the table can say what failed.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

from .harness import emit


def main(argv: list[str]) -> None:
    scenario, peer, params = argv[0], argv[1], json.loads(argv[2])
    module = importlib.import_module(f"benchmarks.{scenario}")
    try:
        result = module.measure(peer, params)
    except BaseException as exc:  # noqa: BLE001 - reported, not hidden
        emit({"error": f"{type(exc).__name__}: {exc}"[:300], "traceback": traceback.format_exc()[-3000:]})
        raise SystemExit(1) from None
    emit(result)


if __name__ == "__main__":
    main(sys.argv[1:])

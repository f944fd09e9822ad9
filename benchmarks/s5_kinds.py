"""S5: which peers run functions defined in a notebook: plain functions, lambdas, closures, and
instances of notebook-defined classes (and, as a control, a function from an importable module), when workers are spawned or come from a fork server.

A notebook's ``__main__`` has no file, so a spawned worker cannot import it to find ``double``.
We reproduce exactly that with ``python -c CELL``: ``__main__`` has no ``__file__`` there either, so
multiprocessing's spawn preparation has nothing to re-import (the mechanism that breaks notebooks).
Each case is its own process with a timeout: a case that never returns is reported as "hangs" and
its processes are killed, instead of the run waiting forever. ``pool-fork`` is the reference: fork
copies ``__main__`` into the workers, so everything works there (at fork's other costs, see S2).
"""

from __future__ import annotations

from . import report
from .harness import Case, Options, Outcome

NAME = "s5_kinds"
TITLE = "S5  notebook-defined callables under spawn / forkserver"
# "module" is the control: a function from an importable module, which every peer should run.
KINDS = ("module", "function", "lambda", "closure", "class")
PEERS = ("nbparallel", "pool-spawn", "pool-forkserver", "ppe-spawn", "ppe-forkserver", "joblib-loky",
         "mpire-spawn", "mpire-forkserver", "dask", "pool-fork")

# The "notebook cell", run as ``python -c CELL PEER KIND``: everything it defines lives in a
# file-less __main__, as in a Jupyter kernel.
CELL = '''
import sys
from benchmarks.harness import emit
from benchmarks.peers import make_peer
from benchmarks.tasks import tiny

def double(x):
    return x * 2

def make_scaler(k):
    def scale(x):
        return x * k
    return scale

class Doubler:
    def __call__(self, x):
        return x * 2

CALLABLES = {"module": tiny, "function": double, "lambda": lambda x: x * 2, "closure": make_scaler(2), "class": Doubler()}
peer_name, kind = sys.argv[1], sys.argv[2]
peer = make_peer(peer_name)
try:
    peer.start(2)
    out = peer.map(CALLABLES[kind], [1, 2, 3])
    emit({"label": peer.label(), "result": "ok" if out == [2, 4, 6] else "wrong result: %r" % (out,)})
except BaseException as exc:
    emit({"label": peer.label(), "result": "raises", "raised": ("%s: %s" % (type(exc).__name__, exc))[:300]})
finally:
    peer.close()
'''


def plan(opts: Options) -> list[Case]:
    # Dask's LocalCluster alone takes 2-5 s to start on a busy machine: give it that on top,
    # so slowness is not mistaken for a hang.
    return [Case(NAME, peer, {"kind": kind}, opts.s5_timeout + (15 if peer == "dask" else 0),
                 args=["-c", CELL, peer, kind])
            for peer in PEERS for kind in KINDS]


def measure(peer_name: str, params: dict[str, object]) -> dict[str, object]:
    raise NotImplementedError("S5 cases run the notebook cell above with python -c, not benchmarks.child")


def verdict(outcome: Outcome) -> str:
    """One word or two for a table cell."""
    if outcome.status == "timeout":
        return "hangs"
    if outcome.status != "ok":
        return f"{outcome.status} (exit {outcome.data.get('returncode')})"
    result = str(outcome.data.get("result"))
    if result == "raises":
        return "raises " + str(outcome.data.get("raised", "")).split(":")[0]
    return result


def render(results: list[tuple[Case, Outcome]], opts: Options) -> str:
    by_peer: dict[str, dict[str, Outcome]] = {}
    for case, outcome in results:
        by_peer.setdefault(case.peer, {})[str(case.params["kind"])] = outcome
    lines = []
    messages: dict[str, str] = {}
    for peer, cells in by_peer.items():
        leaked = sum(len(o.leaked) for o in cells.values())  # after a clean end; hangs are killed by design
        note = f"{leaked} process(es) left behind, killed" if leaked else None
        lines.append([peer, *(verdict(cells[k]) if k in cells else None for k in KINDS), note])
        for kind, outcome in cells.items():
            raised = outcome.data.get("raised")
            if raised:
                messages.setdefault(f"{peer} / {kind}", str(raised).replace("\n", " ")[:150])
    head = (f"{TITLE}: defined in a file-less __main__ (python -c), 3 items, 2 workers, "
            f"hang timeout {opts.s5_timeout:g} s\n")
    text = head + report.table(["peer", *KINDS, "note"], lines)
    if messages:
        text += "\nwhat was raised:\n" + "\n".join(f"  {where}: {msg}" for where, msg in messages.items())
    return text

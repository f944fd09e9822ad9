"""%%parallel's line parsing and cell analysis, through IPython's own test shell.

Everything here happens before any work starts, so no test needs the sidecar except the last few,
which run a tiny cell for real to check what lands in the namespace.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import get_ipython

import nbparallel
from nbparallel.cellmagic import background
from nbparallel.kernel import runner as client
from nbparallel.payload import pickling as ser
from nbparallel.cellmagic.cellargs import combine, evaluate_maps, split_line
from nbparallel.cellmagic.cellcode import CellError, analyse
from nbparallel.cellmagic.cellrunner import CellRunner, ModuleRef, capture, unpicklable_capture
from nbparallel.cellmagic.magics import DEFAULT_OUT, MISSING, ParallelMagics
from nbparallel.results import Result, Results


@pytest.fixture(scope="module")
def ip() -> Any:
    shell = get_ipython()
    shell.register_magics(ParallelMagics)  # not load_ext: that would start the sidecar
    return shell


@pytest.fixture
def fresh(ip: Any) -> Iterator[Any]:
    """The shell with no sidecar running, so a test can check that nothing was started."""
    nbparallel.shutdown()
    ip.user_ns.update(base=10, lock=threading.Lock(), items=[1, 2, 3])
    yield ip


# -- the line ------------------------------------------------------------------------------------


def test_split_keeps_brackets_and_strings_whole() -> None:
    line = "--map alpha=[0.1, 1.0] --map s=('a b', \"c d\") --out res -n 2"
    assert split_line(line) == ["--map", "alpha=[0.1, 1.0]", "--map", "s=('a b', \"c d\")", "--out", "res", "-n", "2"]


def test_split_strips_shell_quotes_around_a_whole_assignment() -> None:
    assert split_line('--map "a=range(1, 3)"') == ["--map", "a=range(1, 3)"]
    assert split_line("--map a={'k': [1, 2]}") == ["--map", "a={'k': [1, 2]}"]


def test_split_reports_unbalanced_input() -> None:
    with pytest.raises(CellError, match="bracket"):
        split_line("--map a=[1, 2")
    with pytest.raises(CellError, match="quote"):
        split_line("--map a='x")


def test_grid_is_the_cartesian_product_last_varying_fastest() -> None:
    params = evaluate_maps(["a=[1, 2]", "b='xy'"], {})
    assert combine(params, zipped=False) == (("a", "b"), [(1, "x"), (1, "y"), (2, "x"), (2, "y")])


def test_zip_pairs_values_and_rejects_different_lengths() -> None:
    params = evaluate_maps(["a=[1, 2]", "b=range(10, 12)"], {})
    assert combine(params, zipped=True) == (("a", "b"), [(1, 10), (2, 11)])
    with pytest.raises(CellError, match="a has 2, b has 3"):
        combine(evaluate_maps(["a=[1, 2]", "b=[1, 2, 3]"], {}), zipped=True)


def test_expr_is_evaluated_in_the_namespace_without_assigning_there() -> None:
    namespace = {"n": 3}
    assert evaluate_maps(["k=[(m := n), m * 2]"], namespace) == [("k", [3, 6])]
    assert "m" not in namespace


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("alpha", "needs NAME=EXPR"),
        ("1x=[1]", "not a valid variable name"),
        ("class=[1]", "not a valid variable name"),
        ("a=undefined_name", "NameError"),
        ("a=5", "int, which is not iterable"),
        ("a=[1/0]", "ZeroDivisionError"),
        ("a=[threading.Lock()]", "cannot be sent to the workers"),
    ],
)
def test_bad_map_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(CellError, match=message):
        evaluate_maps([spec], {"threading": threading})


def test_a_name_given_twice_is_refused() -> None:
    with pytest.raises(CellError, match="given twice"):
        evaluate_maps(["a=[1]", "a=[2]"], {})


# -- the cell ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "reads"),
    [
        ("x = x + 1", ["x"]),
        ("y = 2\nprint(y)", ["print"]),
        ("total = 0\nfor i in items:\n    total += i\ntotal", ["items"]),
        ("acc += 1", ["acc"]),
        ("def f():\n    return helper(z)\nhelper = g\nf()", ["g", "z"]),
        ("[v * k for v in vals]", ["vals", "k"]),
        ("g = lambda q=d: q + e", ["d", "e"]),
        ("import numpy as np\nnp.sum(data)", ["data"]),
        ("if (n := size) > 2:\n    n", ["size"]),
        ("class C(Base):\n    scale = factor\nC()", ["Base", "factor"]),
        ("try:\n    risky()\nexcept KeyError as err:\n    err", ["risky", "KeyError"]),
        ("del tmp", ["tmp"]),
        ("with opener() as fh:\n    fh.read()", ["opener"]),
    ],
)
def test_reads_follow_evaluation_order(source: str, reads: list[str]) -> None:
    assert analyse(source).reads == reads


def test_assigns_are_the_top_level_bindings_in_order() -> None:
    code = analyse("import os\nb = 1\nfor i in range(2):\n    c = i\ndef f():\n    inner = 1\n")
    assert code.assigns == ["os", "b", "i", "c", "f"]


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(CellError, match=r"syntax error \(line 2\)"):
        analyse("a = 1\nb = (\n")


def test_capture_takes_only_what_the_cell_reads() -> None:
    import math

    namespace = {"math": math, "data": [1, 2], "unused": object(), "len": "shadowed builtin"}
    code = analyse("math.fsum(data) + len(x) + abs(-1)")
    assert capture(code, namespace, provided=("x",)) == {
        "math": ModuleRef("math"),
        "data": [1, 2],
        "len": "shadowed builtin",
    }


def test_builtins_added_by_the_host_travel(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import json

    monkeypatch.setattr(builtins, "host_added", json.dumps, raising=False)  # as IPython adds display()
    assert capture(analyse("host_added(print)"), {}) == {"host_added": json.dumps}


def test_capture_refuses_names_that_exist_nowhere() -> None:
    with pytest.raises(CellError, match=r"reads 'nowhere', 'gone', which are not defined"):
        capture(analyse("nowhere + gone + abs(1)"), {})


def test_a_star_import_makes_unknown_names_acceptable() -> None:
    assert capture(analyse("from math import *\npi"), {}) == {}


def test_runner_runs_like_a_cell_in_a_fresh_namespace() -> None:
    import math

    code = analyse("acc = base + a\nacc += b\nmath.floor(acc)")
    runner = CellRunner(code.source, code.filename, ("a", "b"), capture(code, {"base": 0.5, "math": math}, ("a", "b")))
    assert runner((1, 2)) == 3
    assert runner((10, 20)) == 30  # nothing left over from the first run
    assert CellRunner("x = 1", "<t>", (), {})() is None  # no last expression: None


def test_background_runner_returns_what_the_cell_assigned() -> None:
    code = analyse("a = 1\nlock = threading.Lock()\nb = a + 1")
    runner = CellRunner(code.source, code.filename, (), {"threading": ModuleRef("threading")}, mode="names",
                        assigns=code.assigns)
    blob, skipped = runner()
    assert pickle.loads(blob) == {"a": 1, "b": 2}
    assert list(skipped) == ["lock"] and "cannot be pickled" in skipped["lock"]


def test_an_unpicklable_capture_is_named() -> None:
    assert unpicklable_capture(CellRunner("a", "<t>", (), {"a": 1})) is None
    problem = unpicklable_capture(CellRunner("lock", "<t>", (), {"n": 1, "lock": threading.Lock()}))
    assert problem is not None and "'lock' (_thread.lock) cannot be sent" in problem


def test_the_runner_travels_without_its_compiled_code() -> None:
    runner = CellRunner("a * 2", "<t>", ("a",), {})
    assert runner((1,)) == 2  # compiles and caches here
    rebuilt = pickle.loads(ser.dumps(runner))
    assert rebuilt._compiled is None and rebuilt((21,)) == 42


def test_results_records_and_sentinel() -> None:
    results = Results([Result({"a": 1}, {"loss": 0.5}), Result({"a": 2}, MISSING)], ["a"])
    assert results.values == [{"loss": 0.5}, MISSING] and results.missing == [1]
    assert results.records() == [{"a": 1, "loss": 0.5}, {"a": 2, "value": MISSING}]
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING and not MISSING
    assert "2 runs over a (1 missing)" in repr(results)


def test_to_dataframe_has_a_column_per_parameter() -> None:
    results = Results([Result({"a": 1, "b": "x"}, 2.5)], ["a", "b"])
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match=r"needs pandas .* records\(\)"):
            results.to_dataframe()
    else:
        assert results.to_dataframe().to_dict("records") == [{"a": 1, "b": "x", "value": 2.5}]


# -- through the shell: bad arguments stop before anything starts ---------------------------------


@pytest.mark.parametrize(
    ("line", "body", "message"),
    [
        ("--map a=[1] --bogus", "a", "unrecognized arguments: --bogus"),
        ("--map a=[1] --errors maybe", "a", "invalid choice: 'maybe'"),
        ("--map a=undefined", "a", r"--map a=undefined failed: NameError"),
        ("--map a=[1] --out 2x", "a", "--out needs a variable name"),
        ("--map a=[1] -n 0", "a", "-n 0"),
        ("--map a=[1] --bg", "a", "--bg runs the cell once"),
        ("--bg --rate 5/s", "a", "--bg runs the cell once"),
        ("--map a=[1] --rate fast", "a", "cannot read the rate 'fast'"),
        ("--map a=[1] --concurrency 0", "a", "concurrency must be a positive int"),
        ("--out r", "a", "say what to run"),
        ("--map a=[1]", "a + missing_name", "'missing_name', which is not defined"),
        ("--map a=[1]", "lock", "'lock' \\(_thread.lock\\) cannot be sent"),
        ("--map a=[1]", "!ls\na", "IPython magics"),
        ("--map a=[1]", "a +", "syntax error"),
    ],
)
def test_bad_arguments_are_usage_errors_and_start_nothing(fresh: Any, line: str, body: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        fresh.run_cell_magic("parallel", line, body)
    assert client.current_client() is None


def test_an_unpicklable_capture_starts_no_background_job(fresh: Any) -> None:
    jobs_before = dict(background.jobs)
    with pytest.raises(UsageError, match="'lock' \\(_thread.lock\\) cannot be sent"):
        fresh.run_cell_magic("parallel", "--bg", "x = lock")
    assert background.jobs == jobs_before
    # submit() starts the sidecar before it pickles the function (see the report), so only the job
    # is checked here: the sidecar holds none.
    assert nbparallel.status()["jobs"] == 0


def test_a_usage_error_shows_one_line_and_no_traceback(fresh: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result = fresh.run_cell("%%parallel --map a=[1] --bogus\na")
    assert isinstance(result.error_in_exec, UsageError)
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "UsageError: %%parallel: unrecognized arguments: --bogus" in text
    assert "Traceback" not in text
    assert client.current_client() is None


def test_help_shows_the_full_usage(ip: Any) -> None:
    doc = ip.find_cell_magic("parallel").__doc__
    assert "%%parallel [--map NAME=EXPR]" in doc
    for option in ("--zip", "--out", "--errors", "--no-progress", "--bg", DEFAULT_OUT, "MISSING"):
        assert option in doc


# -- through the shell, for real: what lands in the namespace -------------------------------------


def test_grid_run_stores_params_beside_values_and_leaks_nothing(ip: Any) -> None:
    ip.user_ns.update(base=10)
    ip.user_ns.pop("inner", None)
    shown = ip.run_cell_magic("parallel", "--map a=[1, 2] --map b=[0, 5] --no-progress", "inner = base * a\ninner + b")
    stored = ip.user_ns[DEFAULT_OUT]
    assert shown is stored and isinstance(stored, Results)
    assert [(r.params, r.value) for r in stored] == [
        ({"a": 1, "b": 0}, 10), ({"a": 1, "b": 5}, 15), ({"a": 2, "b": 0}, 20), ({"a": 2, "b": 5}, 25)]
    assert "inner" not in ip.user_ns


def test_out_stores_quietly_and_failures_keep_finished_values(ip: Any) -> None:
    assert ip.run_cell_magic("parallel", "--map a=[1, 0, 2] --out ratios --errors return", "6 // a") is None
    ratios = ip.user_ns["ratios"]
    assert ratios.values[0] == 6 and ratios.values[2] == 3 and ratios.failed == [1]
    assert isinstance(ratios.values[1], ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        ip.run_cell_magic("parallel", "--map a=[1, 0] --out partial -n 1", "6 // a")
    partial = ip.user_ns["partial"]
    assert partial.values[0] == 6 and isinstance(partial.values[1], ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        ip.run_cell_magic("parallel", "--map a=[0, 1, 2] --out partial -n 1",
                          "import time\nif a:\n    time.sleep(30)\n6 // a")
    assert ip.user_ns["partial"].missing == [1, 2]  # the first failure cancelled the rest


def test_pool_commands(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("nbparallel", "workers 1")
    assert "the pool has 1 workers" in capsys.readouterr().out
    first = nbparallel.api.start()
    ip.run_line_magic("nbparallel", "restart")
    assert f"sidecar pid {nbparallel.api.start()}" in capsys.readouterr().out and nbparallel.api.start() != first
    ip.run_line_magic("nbparallel", "status")
    status = capsys.readouterr().out
    assert "1 workers" in status and len(re.findall(r"(starting|idle)", status)) == 1
    nbparallel.configure(workers=None)
    ip.run_line_magic("nbparallel", "stop")
    assert client.current_client() is None
    for line, message in [("", "give a command"), ("bogus", "unknown command 'bogus'"), ("workers two", "workers N"),
                          ("cancel 99", "no background job '99'"), ("wait x", "no background job 'x'")]:
        with pytest.raises(UsageError, match=message):
            ip.run_line_magic("nbparallel", line)


def test_load_and_unload_the_extension(ip: Any) -> None:
    try:
        ip.run_line_magic("load_ext", "nbparallel")
        assert client.current_client() is not None  # started at once
        ip.run_line_magic("unload_ext", "nbparallel")
        assert ip.find_cell_magic("parallel") is None and ip.find_line_magic("nbparallel") is None
        assert client.current_client() is None
    finally:
        ip.register_magics(ParallelMagics)

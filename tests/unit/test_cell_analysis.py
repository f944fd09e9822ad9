"""``analyse``: which names a ``%%parallel`` cell reads from the notebook, and which it assigns.

Pure code, no processes, and the same answers on every Python from 3.10 (3.12 inlines list, set and
dict comprehensions, so ``symtable`` no longer shows them as scopes of their own). Runs without
installing nbparallel: ``PYTHONPATH=. python -m pytest tests/unit/test_cell_analysis.py``.
"""

from __future__ import annotations

import pytest

from nbparallel.cellmagic.cellcode import CellError, analyse

# (cell source, names read from the notebook in first-use order, names assigned at top level)
CASES = [
    # -- top level, in evaluation order
    ("x = x + 1", ["x"], ["x"]),
    ("y = 2\nprint(y)", ["print"], ["y"]),
    ("total = 0\nfor i in items:\n    total += i\ntotal", ["items"], ["total", "i"]),
    ("acc += step", ["acc", "step"], ["acc"]),
    ("arr[i] += delta", ["arr", "i", "delta"], []),
    ("for i, (a, b) in enumerate(pairs):\n    t = a * b\nelse:\n    done = i", ["enumerate", "pairs"],
     ["i", "a", "b", "t", "done"]),
    ("if flag:\n    z = 1\nprint(z)", ["flag", "print"], ["z"]),
    ("if (n := size) > 2:\n    n", ["size"], ["n"]),
    ("while (chunk := read()):\n    out.append(chunk)", ["read", "out"], ["chunk"]),
    ("msg = f'{name!r}: {value:{width}.{prec}f}'", ["name", "value", "width", "prec"], ["msg"]),
    ("global g\ng = 1\ng", [], ["g"]),
    # -- comprehensions run where they stand; their targets are theirs alone
    ("[v * k for v in range(a)]", ["range", "a", "k"], []),
    ("[v * k for v in vals]", ["vals", "k"], []),
    ("y = [v * k for v in r]\nk = 1", ["r", "k"], ["y", "k"]),
    ("k = 1\ny = [v * k for v in r]", ["r"], ["k", "y"]),
    ("s = {v % m for v in xs}", ["xs", "m"], ["s"]),
    ("d = {key(v): v * w for v in xs if v > lo}", ["xs", "lo", "key", "w"], ["d"]),
    ("total = sum(v * k for v in xs)", ["sum", "xs", "k"], ["total"]),
    ("g = sum(v * k for v in xs)\nk = 2", ["sum", "xs", "k"], ["g", "k"]),
    ("k = 2\ng = list(v * k for v in xs)", ["list", "xs"], ["k", "g"]),
    ("m = [[i * j * s for j in range(i)] for i in rows]", ["rows", "range", "s"], ["m"]),
    ("p = [(a, b) for a in xs if a > lo for b in ys if b < a + hi]", ["xs", "lo", "ys", "hi"], ["p"]),
    ("x = 5\n[x for x in xs]\ny = [i for i in range(3)]\ni", ["xs", "range", "i"], ["x", "y"]),
    ("[v for v in v]", ["v"], []),
    ("{k: v for k, v in pairs}", ["pairs"], []),
    ("[x for x in (y for y in src if y) if x != stop]", ["src", "stop"], []),
    # -- := in a comprehension binds in the cell, at the point the comprehension runs
    ("hits = [y for v in xs if (y := f(v))]\ny", ["xs", "f"], ["y", "hits"]),
    ("total = 0\n[total := total + v for v in xs]", ["xs"], ["total"]),
    ("[(m := max(m, v)) for v in xs]", ["xs", "max", "m"], ["m"]),
    ("[[(last := j) for j in row] for row in grid]\nlast", ["grid"], ["last"]),
    ("any((hit := v) > lim for v in xs)\nhit", ["any", "xs", "lim"], ["hit"]),
    # -- lambdas and functions: bodies run later, so they read the notebook only for names the
    #    cell never binds; decorators, defaults and annotations run at once
    ("g = lambda q=d: q + e", ["d", "e"], ["g"]),
    ("f = lambda x: x * scale\nscale = 2\nf(3)", [], ["f", "scale"]),
    ("fs = [lambda: v for v in xs]", ["xs"], ["fs"]),
    ("fs = [lambda w=v: w * k for v in xs]", ["xs", "k"], ["fs"]),
    ("sorted(xs, key=lambda v: v[col])", ["sorted", "xs", "col"], []),
    ("def f():\n    return helper(z)\nhelper = g\nf()", ["g", "z"], ["f", "helper"]),
    ("def f(a, b=dflt, *args, c: T = 1, **kw) -> R:\n    return a + b + helper(c)",
     ["dflt", "T", "R", "helper"], ["f"]),
    ("@register(kind)\ndef f():\n    return 1", ["register", "kind"], ["f"]),
    ("def outer(n):\n    m = n + off\n    def inner():\n        return m * n * far\n    return inner",
     ["off", "far"], ["outer"]),
    ("def counter():\n    c = 0\n    def inc():\n        nonlocal c\n        c += 1\n        return c\n"
     "    return inc", [], ["counter"]),
    ("def setup():\n    global g\n    g = make()\ndef use():\n    return g", ["make"], ["setup", "use"]),
    ("def use():\n    global g\n    return g", ["g"], ["use"]),
    ("def setup():\n    global g\n    g = 1\nsetup()\nprint(g)", ["print", "g"], ["setup"]),
    ("def f():\n    k = 1\n    return [v * k for v in xs]", ["xs"], ["f"]),
    ("def f(xs):\n    return {v: v * k for v in xs}", ["k"], ["f"]),
    ("def f(n):\n    return [lambda: n * v for v in range(n)]", ["range"], ["f"]),
    ("def f():\n    return [(w := v) for v in xs], w", ["xs"], ["f"]),
    ("def f():\n    print(x)\n    x = 1", ["print"], ["f"]),
    ("def f():\n    del tmp", [], ["f"]),
    ("def f():\n    z: Hidden = 1\n    return z", [], ["f"]),
    ("def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)", [], ["fact"]),
    ("async def collect():\n    return [x * k async for x in source() if x]", ["source", "k"], ["collect"]),
    ("async def run(xs):\n    return [await fetch(x) for x in xs]", ["fetch"], ["run"]),
    # -- class bodies run at once, in order; their names are not visible inside their functions
    ("class C(Base):\n    scale = factor\nC()", ["Base", "factor"], ["C"]),
    ("class C:\n    a = b\n    b = 2\n    c = b + a", ["b"], ["C"]),
    ("class C:\n    v = k\nk = 1", ["k"], ["C", "k"]),
    ("class C:\n    s = 2\n    def m(self):\n        return s * self.t", ["s"], ["C"]),
    ("class C:\n    k = 1\n    f = lambda self: k", ["k"], ["C"]),
    ("class C:\n    n = 2\n    xs = [1, 2]\n    ys = [x * n for x in xs]", ["n"], ["C"]),
    ("class C:\n    def m(self):\n        return helper()\ndef helper():\n    return 1", [], ["C", "helper"]),
    ("class Node:\n    def child(self):\n        return Node()", [], ["Node"]),
    ("@dataclass\nclass P(metaclass=Meta):\n    x: int = 0", ["dataclass", "Meta", "int"], ["P"]),
    ("def make():\n    class Inner:\n        size = limit\n        def get(self):\n            return size\n"
     "    return Inner", ["limit", "size"], ["make"]),
    ("def make(n):\n    class K:\n        m = n\n    return K", [], ["make"]),
    # -- match: captures bind, class and value patterns read
    ("match cmd:\n    case Point(x=0, y=yy):\n        r = yy\n    case [first, *rest]:\n        r = rest\n"
     "    case {'k': val, **others}:\n        r = others\n    case Color.RED | Color.BLUE:\n        r = 0\n"
     "    case str() as s if s:\n        r = s\n    case other:\n        r = other",
     ["cmd", "Point", "Color", "str"], ["yy", "r", "first", "rest", "val", "others", "s", "other"]),
    ("match p:\n    case (a, b):\n        pass\nprint(a)", ["p", "print"], ["a", "b"]),
    # -- the rest of the statements that bind
    ("try:\n    risky()\nexcept (KeyError, MyErr) as err:\n    log(err)\nfinally:\n    done()",
     ["risky", "KeyError", "MyErr", "log", "done"], ["err"]),
    ("with opener(path) as fh, lock:\n    data = fh.read()", ["opener", "path", "lock"], ["fh", "data"]),
    ("with ctx() as (a, b):\n    pass", ["ctx"], ["a", "b"]),
    ("del tmp", ["tmp"], []),
    ("tmp = 1\ndel tmp", [], ["tmp"]),
    ("import os.path\nimport numpy.linalg as la\nos.path.join(la.x)", [], ["os", "la"]),
    ("from collections import OrderedDict as OD, deque\nOD(deque())", [], ["OD", "deque"]),
    ("import numpy as np\nnp.sum(data)", ["data"], ["np"]),
    ("x: Number = compute()\ny: Alias\nw: int", ["compute", "Number", "Alias", "int"], ["x"]),
]


@pytest.mark.parametrize(("source", "reads", "assigns"), CASES)
def test_reads_and_assigns(source: str, reads: list[str], assigns: list[str]) -> None:
    code = analyse(source)
    assert (code.reads, code.assigns) == (reads, assigns)


# Type parameters and ``type`` aliases (Python 3.12+): the parameters are the definition's own.
GENERIC_CASES = [
    ("def first[T](xs: list[T]) -> T:\n    return xs[0]", ["list"], ["first"]),
    ("def f[T: Bound](x: T) -> T:\n    return x", ["Bound"], ["f"]),
    ("class Box[T](Base[T]):\n    item: T\n    def get(self) -> T:\n        return self.item", ["Base"], ["Box"]),
    ("type Pair[K] = tuple[K, V]", ["tuple", "V"], ["Pair"]),
    ("type Tree = list[Tree] | Leaf\nLeaf = int", ["int", "list"], ["Tree", "Leaf"]),
]


@pytest.mark.skipif("sys.version_info < (3, 12)", reason="type parameters are Python 3.12+")
@pytest.mark.parametrize(("source", "reads", "assigns"), GENERIC_CASES)
def test_type_parameters(source: str, reads: list[str], assigns: list[str]) -> None:
    code = analyse(source)
    assert (code.reads, code.assigns) == (reads, assigns)


def test_a_star_import_is_flagged() -> None:
    code = analyse("from math import *\npi")
    assert code.star_import and code.reads == ["pi"]
    assert not analyse("from math import pi").star_import


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("a = 1\nb = (\n", 2),
        ("nonlocal x", 1),  # the parser takes these; only the compiler refuses them
        ("x = 1\nreturn x", 2),
        ("class C:\n    ys = [(y := v) for v in xs]", 2),
        ("def f():\n    return [x async for x in src]", 2),  # top-level await is fine; in a plain def it is not
    ],
)
def test_a_syntax_error_names_the_line(source: str, line: int) -> None:
    with pytest.raises(CellError, match=rf"syntax error \(line {line}\)"):
        analyse(source)

"""The IPython extension: ``%%parallel``, ``%nbparallel`` and ``load_ipython_extension``.

The only module that imports IPython. A thin layer over the public API: a ``--map`` cell is one
``api.map`` call, a ``--bg`` cell one ``submit``. The rest lives in IPython-free modules: the line
in ``cellargs``, the names a cell reads in ``cellcode``, the cell turned into something a worker
runs in ``cellrunner``, what a ``--map`` cell stores in ``results``, and ``--bg`` jobs in
``background``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from .. import api, config
from . import background, cellcode, cellrunner
from ..payload import tracebacks
from .cellargs import checkpoint_option, combine, evaluate_maps, split_line
from ..errors import NbParallelError, SerializationError, completed_of, details
from ..futures import submit
from .. import checkpoint as durable
from ..kernel.jobspec import Flow
from ..kernel.output import presenting
from ..kernel.tasks import stop
from ..progress.tracking import track_future
from .params import Params
from ..results import MISSING, Result, Results

__all__ = ["DEFAULT_OUT", "MISSING", "ParallelMagics", "load_ipython_extension", "unload_ipython_extension"]

#: Where a ``--map`` cell stores its ``Results`` when ``--out`` is not given.
DEFAULT_OUT = "_parallel"


# The %%parallel options, for IPython's magic_arguments (which makes the usage text of ``%%parallel?``).
OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--map",), dict(action="append", default=[], metavar="NAME=EXPR",
                      help="run the cell once per value of EXPR, with NAME set to it; several --map make a grid")),
    (("--zip",), dict(action="store_true", help="pair the --map values instead of taking every combination")),
    (("--out",), dict(metavar="VAR", help=f"store the results in VAR (default: {DEFAULT_OUT}, and shown)")),
    (("-n", "--workers"), dict(type=int, metavar="N", help="run at most N at once (default: the whole pool)")),
    (("--errors",), dict(choices=("raise", "return"), default="raise",
                         help="raise: stop at the first failure; return: keep the exception as that run's value")),
    (("--no-progress",), dict(action="store_true", help="show no progress display")),
    (("--concurrency",), dict(type=int, metavar="N", help="a cell with top-level await: at most N runs in flight "
                              "across the workers (default 64)")),
    (("--rate",), dict(metavar="RATE", help="at most RATE runs start per unit of time across the workers, "
                       "e.g. 50/s or 3000/min")),
    (("--bg",), dict(action="store_true",
                     help="run the cell once, in the background; its variables come back when it finishes")),
    (("--checkpoint",), dict(metavar="PATH", help="write each run's result to the journal PATH as it finishes; "
                             "run again, only the runs it lacks run (nbparallel.checkpoint)")),
    (("--on-change",), dict(choices=("error", "restart", "keep"), default=None,
                            help="when the cell or the values it reads changed since PATH was written: "
                                 "error (default), restart (discard the old results) or keep them")),
]


def _add_options(magic: Callable[..., Any]) -> Any:
    """Apply magic_arguments' decorators by hand: they are untyped, and each one only records
    itself on the function, so the function object is changed in place."""
    add_argument: Any = argument
    make_parser: Any = magic_arguments
    setattr(magic, "argcmd_name", "%parallel")  # the usage line then reads "%%parallel"
    for names, options in reversed(OPTIONS):
        add_argument(*names, **options)(magic)
    make_parser()(magic)
    return getattr(magic, "parser")


@magics_class
class ParallelMagics(Magics):
    """``%%parallel`` and ``%nbparallel``."""

    @property
    def namespace(self) -> dict[str, Any]:
        """The notebook's variables."""
        assert self.shell is not None  # IPython sets it when it registers the magics
        return self.shell.user_ns  # type: ignore[no-any-return]

    @no_var_expand  # "{...}" in an EXPR is Python, not a template
    @cell_magic
    def parallel(self, line: str, cell: str) -> Results | None:
        """Run the cell in nbparallel's workers: once per parameter value, or once in the background.

        ``--map NAME=EXPR``: EXPR is evaluated in the notebook and the cell runs once per value, in
        parallel, with NAME set to it. Several ``--map`` make a grid (every combination, the last
        one varying fastest); ``--zip`` pairs them instead. EXPR may contain spaces inside brackets.

        The notebook variables the cell reads are found by analysing the cell and sent once per
        call (modules by name: the worker imports them). Reading a name that exists nowhere is an
        error before anything runs. Assignments inside the cell stay in the worker.

        The value of the cell's last expression in each run is collected, in input order, into a
        ``Results`` (a list of ``Result(params, value)``; ``.values``, ``.records()``,
        ``.to_dataframe()``) stored in VAR, or in ``_parallel`` and shown when ``--out`` is missing.
        If the stop button or a failure ends the call early, the results so far are stored (then
        the exception is raised): the run that failed holds its exception, and runs that never
        finished hold ``nbparallel.results.MISSING``.

        ``--bg``: the cell runs once, in a worker, and this cell returns at once. When it ends, the
        names it assigned are copied into the notebook (or into VAR as a SimpleNamespace); its
        output and any traceback appear under this cell. See ``%nbparallel jobs | cancel | wait``.

        ``--checkpoint PATH``: each run's result is written to the journal PATH as it finishes; the
        cell run again (after a kernel restart, say) runs only what PATH lacks, and with ``--bg``
        not at all if PATH holds its names. ``--on-change restart|keep`` when the cell or what it
        reads changed since (see ``nbparallel.checkpoint``).
        """
        args = self._parse(line)
        assert self.shell is not None
        source = self.shell.input_transformer_manager.transform_cell(cell)
        try:
            code = cellcode.analyse(source)
            # Remote frames of the cell then read "Cell In[7], line 3" (line 1 is %%parallel's).
            label = tracebacks.calling_cell() or f"Cell In[{self.shell.execution_count}]"
            tracebacks.register_cell(code.filename, code.source, label, 1)
            if args.bg:
                self._background(args, code, cell)
                return None
            return self._map(args, code)
        except cellcode.CellError as exc:
            hints = [hint for name in _quoted_names(str(exc)) if (hint := background.not_yet_assigned(name))]
            raise UsageError("\n".join([f"%%parallel: {exc}", *hints])) from None

    def _parse(self, line: str) -> Any:
        try:
            tokens = split_line(line)
        except cellcode.CellError as exc:
            raise UsageError(f"%%parallel: {exc}") from None
        try:
            args = _PARSER.parse_args(tokens)
        except UsageError as exc:  # argparse's message, e.g. "unrecognized arguments: --bogus"
            raise UsageError(f"%%parallel: {exc}") from None
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"%%parallel: --out needs a variable name, got {args.out!r}")
        if args.bg and (args.map or args.zip or args.workers is not None or args.concurrency or args.rate):
            raise UsageError("%%parallel: --bg runs the cell once; --map, --zip, -n, --concurrency and --rate do "
                             "not apply to it")
        if not args.bg and not args.map:
            raise UsageError("%%parallel: say what to run: --map NAME=EXPR (once per value) or --bg")
        try:
            Flow.make(args.concurrency, args.rate, None)  # "--rate fast" is refused before anything runs
        except (TypeError, ValueError) as exc:
            raise UsageError(f"%%parallel: {exc}") from None
        if args.workers is not None:
            try:
                config.resolve_workers(args.workers)
            except ValueError as exc:
                raise UsageError(f"%%parallel: -n {args.workers}: {exc}") from None
        try:
            args.checkpoint = checkpoint_option(args.checkpoint, args.on_change)
        except cellcode.CellError as exc:
            raise UsageError(f"%%parallel: {exc}") from None
        return args

    def _map(self, args: Any, code: cellcode.CellCode) -> Results | None:
        namespace = self.namespace
        params = evaluate_maps(args.map, namespace)
        names, plain = combine(params, zipped=args.zip)
        items = [Params(names, values) for values in plain]  # named by their parameters: "k=0, seed=3"
        runner = cellrunner.CellRunner(code.source, code.filename, names, cellrunner.capture(code, namespace, names))
        progress = False if args.no_progress else None
        out = args.out or DEFAULT_OUT

        def results(values: Callable[[int], Any]) -> Results:
            return Results((Result(dict(zip(names, item)), values(i)) for i, item in enumerate(items)), names)

        try:
            # The engine pickles the runner first, before it starts anything.
            with presenting(describe_sweep(names, zipped=args.zip), lambda i: repr(items[i]), unit="runs"):
                values = api.map(runner, items, workers=args.workers, errors=args.errors, progress=progress,
                                 checkpoint=args.checkpoint, concurrency=args.concurrency, rate=args.rate)
        except durable.CheckpointError:  # the journal refused the call: nothing ran, nothing to keep
            raise
        except BaseException as error:  # a run's own exception too, as it raised it (errors.details)
            completed = completed_of(error)
            if completed is None:  # not the call's: nothing was kept
                raise
            _explain_unpicklable(error, runner)
            kept = dict(completed)
            found = details(error)
            failed = found.index if found is not None else None
            if failed is not None:  # the run that stopped the call holds its exception
                kept[failed] = error
            namespace[out] = results(lambda i: kept.get(i, MISSING))
            print(f"nbparallel: stopped; {len(completed)} of {len(items)} results kept in {out} "
                  "(runs that did not finish are MISSING)", file=sys.stderr, flush=True)
            raise
        namespace[out] = stored = results(values.__getitem__)
        return None if args.out else stored

    def _background(self, args: Any, code: cellcode.CellCode, cell: str) -> None:
        captured = cellrunner.capture(code, self.namespace)
        runner = cellrunner.CellRunner(code.source, code.filename, (), captured, mode="names", assigns=code.assigns)
        try:
            # Its progress display is named for the cell from its first frame on.
            with presenting(f"%%parallel --bg: {background.describe_cell(cell, list(code.assigns))}"):
                if args.checkpoint is None:
                    future = submit(runner)
                else:  # done at once when the journal holds this very cell's names
                    future = durable.submit(args.checkpoint, runner)
                if getattr(future, "restored", False):
                    print(f"nbparallel: restored from {args.checkpoint.path} (the cell did not run again)")
        except SerializationError as error:
            _explain_unpicklable(error, runner)
            raise
        job = background.start(future, cell, self.namespace, args.out, list(code.assigns))
        track_future(job.future, f"%%parallel --bg: {job.first_line}", progress=False if args.no_progress else None)

    @line_magic
    def nbparallel(self, line: str) -> None:
        """Manage nbparallel's pool and background jobs.

        %nbparallel status       the sidecar's PID and memory; each worker's state and memory
        %nbparallel connect ADDR run every call on the Dask cluster at ADDR (tcp://host:8786), or
                                 on a new Dask LocalCluster with "local"
        %nbparallel disconnect   run on this machine again
        %nbparallel workers N    resize the pool to N workers (-1: all CPUs)
        %nbparallel restart      stop the pool and start a fresh one
        %nbparallel stop         stop the pool (the next call starts it again)
        %nbparallel jobs         list the %%parallel --bg jobs
        %nbparallel cancel ID    stop background job ID
        %nbparallel wait [ID]    wait for job ID (default: every job not waited for yet); raise if it failed
        """
        words = line.split()
        command, rest = (words[0], words[1:]) if words else ("", [])
        handler = getattr(self, f"_cmd_{command}", None) if command else None
        if handler is None:
            what = f"unknown command {command!r}" if command else "give a command"
            raise UsageError(f"%nbparallel: {what}; one of: status, connect ADDRESS, disconnect, workers N, "
                             "restart, stop, jobs, cancel ID, wait [ID]")
        handler(rest)

    def _cmd_status(self, rest: list[str]) -> None:
        print(format_status(api.status()))

    def _cmd_connect(self, rest: list[str]) -> None:
        if len(rest) != 1:
            raise UsageError('%nbparallel connect ADDRESS: give a scheduler address (tcp://host:8786) or "local"')
        background.cancel_running()
        try:
            api.configure(cluster=rest[0])
        except (ImportError, TypeError) as exc:
            raise UsageError(f"%nbparallel connect: {exc}") from None
        print(describe_connection(api.status()))

    def _cmd_disconnect(self, rest: list[str]) -> None:
        background.cancel_running()
        api.configure(cluster=None)
        print("nbparallel: calls run on this machine again")

    def _cmd_workers(self, rest: list[str]) -> None:
        try:
            count = int(rest[0]) if len(rest) == 1 else None
            if count is None:
                raise ValueError("give one number")
            api.configure(workers=count)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"%nbparallel workers N: {exc}") from None
        print(f"nbparallel: the pool has {config.resolve_workers(count)} workers")

    def _cmd_restart(self, rest: list[str]) -> None:
        background.cancel_running()
        api.shutdown()
        print(f"nbparallel: restarted (sidecar pid {api.start()})")

    def _cmd_stop(self, rest: list[str]) -> None:
        background.cancel_running()
        api.shutdown()
        print("nbparallel: stopped; the next parallel call starts the pool again")

    def _cmd_jobs(self, rest: list[str]) -> None:
        if not background.jobs:
            print("nbparallel: no background jobs")
        for job in background.jobs.values():
            print(f"{job.describe()}  | {job.first_line}")

    def _job(self, word: str) -> background.BackgroundJob:
        job = background.jobs.get(int(word)) if word.isdigit() else None
        if job is None:
            raise UsageError(f"%nbparallel: no background job {word!r} (see %nbparallel jobs)")
        return job

    def _cmd_cancel(self, rest: list[str]) -> None:
        if len(rest) != 1:
            raise UsageError("%nbparallel cancel ID: give one job number (see %nbparallel jobs)")
        job = self._job(rest[0])
        if stop(job.future):  # running or not
            print(f"nbparallel: job {job.number} cancelled")
        else:
            print(f"nbparallel: job {job.number} had already ended ({job.state})")

    def _cmd_wait(self, rest: list[str]) -> None:
        # By default every job no earlier wait has reported: one that ended before this cell ran
        # still counts, so a notebook run top to bottom never misses a failure.
        chosen = [self._job(word) for word in rest] if rest else [j for j in background.jobs.values() if not j.waited]
        if not chosen:
            print("nbparallel: no background job to wait for")
        background.wait(chosen)


_PARSER = _add_options(ParallelMagics.parallel)


def describe_sweep(names: tuple[str, ...], *, zipped: bool) -> str:
    """How the progress display names a ``--map`` cell: ``%%parallel k × seed`` (``k, seed`` zipped)."""
    return "%%parallel " + (", " if zipped else " × ").join(names)


def _explain_unpicklable(error: BaseException, runner: cellrunner.CellRunner) -> None:
    """If ``error`` is the engine failing to pickle the cell, raise a usage error naming the variable."""
    if isinstance(error, SerializationError) and error.index is None:
        problem = cellrunner.unpicklable_capture(runner)
        if problem is not None:
            raise UsageError(f"%%parallel: {problem}") from None


def _mib(value: Any) -> str:
    return f"{value / 2**20:.1f} MiB" if isinstance(value, (int, float)) and value else "-"


def describe_connection(status: dict[str, Any]) -> str:
    """One line about the Dask cluster ``api.status()`` describes."""
    workers = status.get("workers", [])
    threads = sum(int(w.get("threads") or 0) for w in workers)
    dashboard = f"; dashboard {status['dashboard']}" if status.get("dashboard") else ""
    return (f"nbparallel: connected to the Dask cluster at {status.get('cluster')}: {len(workers)} workers, "
            f"{threads} threads{dashboard}")


def format_status(status: dict[str, Any]) -> str:
    """``api.status()`` as a few lines of text."""
    mib = _mib
    workers = status.get("workers", [])
    dask = status.get("runner") == "dask"
    counts = f"{len(workers)} workers; {status.get('queued', 0)} chunks queued; {status.get('jobs', 0)} jobs"
    if dask:
        head = f"nbparallel Dask bridge pid {status.get('pid')}, {mib(status.get('rss'))}; cluster {status.get('cluster')}"
    else:
        head = f"nbparallel sidecar pid {status.get('pid')}, {mib(status.get('rss'))}"
    lines = [f"{head}; {counts}",
             f"  {'pid':>7}  {'state':<9} {'job':>4} {'item':>6} {'memory':>10} {'done':>6}" + ("  address" if dask else "")]
    for w in workers:
        job = "-" if w.get("job") is None else w["job"]
        item = "-" if w.get("index") is None else w["index"]
        lines.append(f"  {w.get('pid'):>7}  {w.get('state', '?'):<9} {job:>4} {item:>6} {mib(w.get('rss')):>10} "
                     f"{w.get('tasks_done', 0):>6}" + (f"  {w.get('address')}" if dask else ""))
    return "\n".join(lines)


def _quoted_names(message: str) -> list[str]:
    """The identifiers quoted in ``message`` (``name 'model' is not defined`` -> ``['model']``)."""
    return [name for name in re.findall(r"'([A-Za-z_][A-Za-z0-9_]*)'", message)]


def hint_pending_names(result: Any) -> None:
    """After a cell (IPython's post_run_cell): a NameError for a name that a ``--bg`` job still running
    will assign says so, and how to wait for it, under the traceback."""
    error = getattr(result, "error_in_exec", None)
    if not isinstance(error, NameError):
        return
    name = getattr(error, "name", None)
    for candidate in [name] if name else _quoted_names(str(error)):
        hint = background.not_yet_assigned(candidate)
        if hint:
            print(hint, file=sys.stderr, flush=True)
            return


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbparallel``: register the magics and start the sidecar now, before data is loaded."""
    ipython.register_magics(ParallelMagics)
    if hint_pending_names not in ipython.events.callbacks.get("post_run_cell", []):
        ipython.events.register("post_run_cell", hint_pending_names)
    try:
        api.start()
    except NbParallelError as exc:  # the magics still work; the next call tries again
        print(f"nbparallel: the sidecar did not start: {exc}", file=sys.stderr)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbparallel``: cancel background jobs, remove the magics, stop the sidecar."""
    background.cancel_running()
    if hint_pending_names in ipython.events.callbacks.get("post_run_cell", []):
        ipython.events.unregister("post_run_cell", hint_pending_names)
    magics = ipython.magics_manager.magics
    magics["cell"].pop("parallel", None)
    magics["line"].pop("nbparallel", None)
    ipython.magics_manager.registry.pop(ParallelMagics.__name__, None)
    api.shutdown()

"""The Dask backend: the same calls on a real Dask cluster, through the Dask bridge.

A scheduler and two workers (each with a nanny that restarts it) run as separate processes on
127.0.0.1, started with Dask's own command-line entry points. This process plays the kernel: it
switches to the cluster with ``configure(cluster=ADDRESS)``. The scheduler allows one failure per
task (``allowed-failures=1``), so a task whose worker dies is retried once elsewhere and then fails
with ``WorkerCrashed``. One more test puts the scheduler and a worker on separate hosts made with
network namespaces.
"""

from __future__ import annotations

import _thread
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("distributed")
pytestmark = pytest.mark.dask

import nbparallel  # noqa: E402
from nbparallel.crashes import WorkerCrashed  # noqa: E402
from nbparallel.errors import ClusterUnavailable, Interrupted, NbParallelError  # noqa: E402

from _dask_cluster import DaskCluster  # noqa: E402
from _waiting import wait_for  # noqa: E402

SCHEDULER_ENV = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, shared_processes: set[int]) -> Iterator[DaskCluster]:
    folder = tmp_path_factory.mktemp("dask")
    dask = DaskCluster()
    try:
        dask.start_scheduler(folder, "127.0.0.1", env=SCHEDULER_ENV)
        dask.start_workers(folder, "127.0.0.1", 2)
        shared_processes.update(p.pid for p in dask.processes)
        dask.wait_for_workers(2)
        nbparallel.configure(cluster=dask.address)
        yield dask
    finally:
        try:
            nbparallel.configure(cluster=None)
        finally:
            dask.stop()
            shared_processes.difference_update(p.pid for p in dask.processes)


def _busy_workers() -> list[dict[str, Any]]:
    return [w for w in nbparallel.status()["workers"] if w["state"] == "busy"]


@pytest.mark.timeout(90)
def test_map_imap_submit_and_executor_run_on_the_dask_workers(cluster: DaskCluster,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    status = nbparallel.status()
    assert status["runner"] == "dask" and status["cluster"] == cluster.address
    dask_pids = {w["pid"] for w in status["workers"]}
    assert len(status["workers"]) == 2 and dask_pids == set(cluster.worker_pids())
    assert status["pid"] != os.getpid() and status["pid"] not in dask_pids  # the bridge: its own process

    def square(x: int) -> tuple[int, int]:
        print("squaring", x)
        return x * x, os.getpid()

    results = nbparallel.map(square, range(30))
    assert [r[0] for r in results] == [x * x for x in range(30)]
    assert {r[1] for r in results} <= dask_pids
    assert sorted(nbparallel.imap(abs, range(-20, 0), ordered=False)) == list(range(1, 21))
    assert nbparallel.map(pow, [2, 3], [5, 2]) == [32, 9]  # several iterables: fn(*args)
    future = nbparallel.submit(lambda a, b: divmod(a, b), 17, b=5)
    assert future.result(timeout=30) == (3, 2)
    with nbparallel.Executor(max_workers=1) as pool:
        assert list(pool.map(str, range(5))) == ["0", "1", "2", "3", "4"]
    out = capsys.readouterr().out
    assert "[item 7] squaring 7" in out and "[item 29] squaring 29" in out  # worker output, tagged
    # The widget's lanes: one per Dask worker, its address in the lane's note.
    from nbparallel.progress.driver import poll_workers
    from nbparallel.progress.model import LaneBook

    lanes = LaneBook().update(poll_workers(nbparallel.kernel.runner.current_client()) or [], lambda w: (w["state"], None))
    assert {lane["pid"] for lane in lanes} == dask_pids
    assert all(lane["note"].startswith("tcp://127.0.0.1:") and lane["rss"] > 0 for lane in lanes)


@pytest.mark.timeout(60)
def test_an_error_keeps_its_type_remote_traceback_and_item(cluster: DaskCluster) -> None:
    def parse(text: str) -> int:
        return int(text)

    with pytest.raises(ValueError) as caught:
        nbparallel.map(parse, ["1", "2", "three", "4"], chunksize=1)
    error = caught.value
    assert type(error) is ValueError
    found = nbparallel.details(error)
    assert found is not None and found.index == 2 and found.item == "'three'"
    assert "in parse" in found.remote_traceback and "invalid literal" in found.remote_traceback
    assert found.completed.get(0) == 1
    values = nbparallel.map(parse, ["5", "x"], errors="return")
    assert values[0] == 5 and isinstance(values[1], ValueError)
    # Limits Dask cannot keep are refused with a reason, not ignored.
    refused = nbparallel.map(abs, [1], timeout=5, errors="return")[0]
    assert isinstance(refused, NbParallelError) and "cannot be enforced on a Dask cluster" in str(refused)


@pytest.mark.timeout(60)
def test_joblib_work_and_preloads_reach_the_dask_workers(cluster: DaskCluster) -> None:
    joblib = pytest.importorskip("joblib")
    dask_pids = {w["pid"] for w in nbparallel.status()["workers"]}
    with joblib.parallel_config(backend="nbparallel"):
        pids = joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(os.getpid)() for _ in range(6))
    assert set(pids) <= dask_pids
    nbparallel.configure(preload=["wave"])  # a worker plugin: every Dask worker imports it
    try:
        assert nbparallel.map(lambda _: "wave" in sys.modules, range(4), chunksize=1) == [True] * 4
    finally:
        nbparallel.configure(preload=[])


@pytest.mark.timeout(60)
def test_a_large_closure_is_scattered_once_per_call_and_large_results_come_back(cluster: DaskCluster) -> None:
    import numpy as np

    table = np.arange(1_000_000, dtype=np.float64)  # 8 MB captured by the function
    before = nbparallel.status()

    def lookup(i: int) -> float:
        return float(table[i * 1000])

    assert nbparallel.map(lookup, range(12), chunksize=1) == [float(i * 1000) for i in range(12)]
    after = nbparallel.status()
    assert after["scattered"] - before["scattered"] == 1  # 12 tasks, one copy of the function
    assert 8e6 <= after["bytes_scattered"] - before["bytes_scattered"] < 9e6
    arrays = nbparallel.map(lambda n: np.full(n, n, dtype=np.int32), [400_000, 3])  # 1.6 MB out of band
    assert arrays[0].shape == (400_000,) and int(arrays[0][-1]) == 400_000 and list(arrays[1]) == [3, 3, 3]


@pytest.mark.timeout(90)
def test_a_dask_worker_killed_mid_call_is_retried_then_reported(cluster: DaskCluster) -> None:
    def slow_pid(x: int) -> int:
        time.sleep(1.5)
        return os.getpid()

    # Killed from outside while running the task: Dask runs it again on another worker.
    future = nbparallel.submit(slow_pid, 1)
    victim = wait_for(_busy_workers, 20, "a Dask worker to become busy")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert future.result(timeout=30) != victim

    # A task that kills every worker that runs it: after allowed-failures (1) retries, WorkerCrashed.
    def fatal(x: int) -> int:
        if x == 2:
            os._exit(3)
        return x

    results = nbparallel.map(fatal, range(5), chunksize=1, errors="return")
    crash = results[2]
    assert isinstance(crash, WorkerCrashed) and crash.index == 2 and crash.attempts == 2
    assert "KilledWorker" in str(crash) and crash.worker and crash.worker.startswith("tcp://127.0.0.1:")
    # A task queued behind it on the dying worker is charged by Dask too (that is Dask's policy); the
    # others finish.
    assert all(r == i or isinstance(r, WorkerCrashed) for i, r in enumerate(results)), results
    assert sum(r == i for i, r in enumerate(results)) >= 2
    wait_for(lambda: len(nbparallel.status()["workers"]) == 2, 30, "the nannies to restart the workers")


@pytest.mark.timeout(60)
async def fetch_twice(x: int, delay: float = 0.2) -> int:
    import asyncio  # a coroutine function run on the Dask workers

    await asyncio.sleep(delay)
    print("got", x)
    return x * 2


def test_coroutines_run_on_an_event_loop_per_dask_task(cluster: DaskCluster, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    began = time.monotonic()
    assert nbparallel.map(fetch_twice, range(40), concurrency=20) == [x * 2 for x in range(40)]
    assert time.monotonic() - began < 3.5  # 40 x 0.2 s one at a time on 2 threads: 4 s
    assert "[item 7] got 7" in capsys.readouterr().out
    late = nbparallel.map(fetch_twice, range(4), [0.01, 5, 0.01, 0.01], timeout=0.5, errors="return")
    assert late[0] == 0 and late[2:] == [4, 6] and isinstance(late[1], nbparallel.TaskTimeout), late
    with pytest.raises(NbParallelError, match="rate= cannot be enforced on a Dask cluster"):
        nbparallel.map(fetch_twice, range(3), rate="5/s")


def test_an_interrupt_cancels_on_the_cluster_keeps_results_and_the_next_call_works(cluster: DaskCluster) -> None:
    def tick(x: int) -> int:
        time.sleep(0.1)
        return x

    nbparallel.map(tick, range(2))  # the workers are warm
    timer = threading.Timer(2.5, _thread.interrupt_main)  # the stop button, as a KeyboardInterrupt here
    timer.start()
    started = time.monotonic()
    with pytest.raises(Interrupted) as caught:
        nbparallel.map(tick, range(400), chunksize=20)  # 2 s chunks: the second ones are half done
    latency = time.monotonic() - started - 2.5
    timer.join()
    assert latency < 1.0, f"Interrupted came {latency:.2f} s after the interrupt"
    completed = caught.value.completed
    assert completed and all(completed[i] == i for i in completed)
    # The running chunks stop at their next item (not after their whole second), and the cluster idles.
    wait_for(lambda: not _busy_workers(), 0.8, "the cancelled tasks to leave the Dask workers")
    assert nbparallel.map(abs, [-1, -2]) == [1, 2]


BRIDGE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import nbparallel
    nbparallel.configure(cluster=sys.argv[1])
    print("VALUES", nbparallel.map(abs, [-1, -2]), flush=True)
    print("BRIDGE", nbparallel.status()["pid"], flush=True)
    nbparallel.map(time.sleep, [3, 3], chunksize=1)
    """
)


@pytest.mark.timeout(60)
def test_the_bridge_exits_with_the_kernel_even_on_sigkill(cluster: DaskCluster, script_env: dict[str, str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", BRIDGE_SCRIPT, cluster.address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env, start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("VALUES [1, 2]"), first + (proc.stderr.read() if proc.stderr else "")
        bridge = int(proc.stdout.readline().split()[1])
        wait_for(_busy_workers, 10, "the script's sleeps to start")
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()

        def gone() -> bool:
            try:
                return psutil.Process(bridge).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(gone, 2.0, f"the bridge (pid {bridge}) to go with its kernel")
        assert time.monotonic() - killed < 2.0
        # Its tasks were dropped with it: the cluster is free for the next caller.
        wait_for(lambda: not _busy_workers(), 10, "the dead kernel's tasks to stop")
    finally:
        proc.kill()
        proc.communicate()


def test_an_unreachable_scheduler_is_a_clear_error_and_the_setting_stays(cluster: DaskCluster,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setattr(nbparallel.config, "CLUSTER_CONNECT_TIMEOUT", 2.0)  # Dask retries until then
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from nbparallel.kernel import runner as client

    with pytest.raises(ClusterUnavailable, match=f"could not reach the Dask scheduler at tcp://127.0.0.1:{port}"):
        nbparallel.configure(cluster=f"tcp://127.0.0.1:{port}")
    assert client.settings.cluster == cluster.address
    assert nbparallel.map(abs, [-5]) == [5]


MAGICS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from IPython.testing.globalipapp import get_ipython
    import nbparallel
    from nbparallel.cellmagic.magics import ParallelMagics

    ip = get_ipython()
    ip.register_magics(ParallelMagics)
    ip.run_line_magic("nbparallel", f"connect {sys.argv[1]}")
    ip.run_line_magic("nbparallel", "status")
    ip.user_ns["base"] = 100
    ip.run_cell_magic("parallel", "--map x=range(4) --out sums", "import os\\nbase + x, os.getpid()\\n")
    dask_pids = {w["pid"] for w in nbparallel.status()["workers"]}
    print("VALUES", [value for value, _ in ip.user_ns["sums"].values])
    print("ON DASK", {pid for _, pid in ip.user_ns["sums"].values} <= dask_pids)
    ip.run_line_magic("nbparallel", "disconnect")
    print("RUNNER", nbparallel.status().get("runner", "sidecar"))
    """
)


@pytest.mark.timeout(60)
def test_the_magics_connect_show_the_cluster_and_run_a_cell_there(cluster: DaskCluster,
                                                                  script_env: dict[str, str]) -> None:
    # In a child process: IPython's test shell is one per process, and test_magics_parse has ours.
    done = subprocess.run([sys.executable, "-c", MAGICS_SCRIPT, cluster.address], capture_output=True, text=True,
                          env=script_env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"connected to the Dask cluster at {cluster.address}: 2 workers, 2 threads" in done.stdout
    assert "nbparallel Dask bridge pid" in done.stdout
    assert "VALUES [100, 101, 102, 103]" in done.stdout and "ON DASK True" in done.stdout
    assert "RUNNER sidecar" in done.stdout


# -- separate hosts: network namespaces ----------------------------------------------------------------

NETNS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import nbparallel
    from distributed import get_worker

    def where(x):
        print("on", get_worker().address)
        return x * x, get_worker().address

    nbparallel.configure(cluster=sys.argv[1])
    results = nbparallel.map(where, range(20))
    status = nbparallel.status()
    try:
        nbparallel.map(lambda x: 1 // x, [1, 0])
        raised = None
    except ZeroDivisionError as err:
        raised = [nbparallel.details(err).index, "in <lambda>" in nbparallel.details(err).remote_traceback]
    print(json.dumps({"values": [r[0] for r in results], "where": sorted({r[1] for r in results}),
                      "workers": [w["address"] for w in status["workers"]], "raised": raised}))
    """
)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Namespaces A (10.231.7.1) and B (10.231.7.2), joined by a veth pair: nothing else can reach them."""
    def unavailable(why: str) -> None:
        message = f"network namespaces are not available here ({why})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI runs as root and must run this test")
        pytest.skip(message)

    if shutil.which("ip") is None:
        unavailable("no `ip` command: apt-get install iproute2")
    tag = f"{os.getpid() % 100000}"
    a, b = f"nbpA{tag}", f"nbpB{tag}"
    made: list[str] = []
    try:
        for name in (a, b):
            done = _ip("netns", "add", name)
            if done.returncode != 0:
                unavailable(f"ip netns add: {done.stderr.strip()}")
            made.append(name)
        steps = [
            ("link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b),
            ("-n", a, "addr", "add", "10.231.7.1/24", "dev", f"va{tag}"),
            ("-n", b, "addr", "add", "10.231.7.2/24", "dev", f"vb{tag}"),
            ("-n", a, "link", "set", f"va{tag}", "up"), ("-n", b, "link", "set", f"vb{tag}", "up"),
            ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield a, b
    finally:
        for name in made:
            _ip("netns", "del", name)  # takes the veth pair with it


@pytest.mark.timeout(120)
def test_scheduler_and_worker_on_separate_hosts(two_hosts: tuple[str, str], tmp_path: Path,
                                                script_env: dict[str, str]) -> None:
    a, b = two_hosts
    dask = DaskCluster()
    try:
        address = dask.start_scheduler(tmp_path, "10.231.7.1", netns=a, env=SCHEDULER_ENV)
        dask.start_workers(tmp_path, "10.231.7.2", 1, netns=b)
        dask.wait_for_workers(1)
        # The "kernel" runs on host A beside the scheduler; its only worker is on host B.
        done = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", NETNS_SCRIPT, address],
                              capture_output=True, text=True, env=script_env, timeout=90)
        assert done.returncode == 0, done.stderr + "\n" + dask.log_tail()
        import json

        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["values"] == [x * x for x in range(20)]
        assert report["where"] == report["workers"] and report["where"][0].startswith("tcp://10.231.7.2:")
        assert report["raised"] == [1, True]
        assert "[item 3] on tcp://10.231.7.2:" in done.stdout
    finally:
        dask.stop()

"""IO-bound work (issue 16): 5,000 requests to a local HTTP service that answers each after 50 ms,
200 in flight, in one run, as ratios to the floor.

    python -m benchmarks.async_io                  # from the repository root
    python -m benchmarks.async_io --items 2000 --json out.json

The service is an asyncio HTTP/1.1 server (keep-alive; a bare protocol, so it costs little CPU) in a
process of its own on 127.0.0.1, started here. The clients, each with connections kept alive and reused:

- ``floor``: ``asyncio.gather`` over a semaphore of 200, in this one process (a small asyncio client);
- ``nbparallel``: ``nbparallel.map(fetch, items, concurrency=200)`` with the same client code in the
  workers (an event loop each, 200 in flight across them);
- ``threads``: ``ThreadPoolExecutor(200)`` with a blocking client (``http.client``);
- ``joblib``: ``joblib.Parallel(n_jobs=200, backend="threading")`` with the blocking client.

Every client keeps its connections (and the floor its event loop, the thread pool its threads) from
its warm-up to the timed run, as nbparallel's workers keep theirs. Three scenarios: ``io`` (each reply awaited, nothing else), ``io + 2 ms parse`` (each reply then
costs 2 ms of CPU: in one process the loop, or the GIL, serializes them) and ``blocking`` (every
100th coroutine calls ``time.sleep(0.1)``, blocking its loop: in one process everything in flight
waits; with nbparallel only that worker's items do). Each client runs a warm-up of 400 items first
(connections opened, modules imported); then the timed runs, ``--repeats`` of each client taken in
turn (floor, nbparallel, threads, joblib, floor, ...), and the table shows each one's best: on a
shared machine the least disturbed run says most about the code.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from typing import Any

DELAY = 0.05  # seconds the service takes to answer
BODY = json.dumps({"items": [{"id": k, "name": f"row {k}", "score": k * 0.5} for k in range(8)]}).encode()
PARSE = 0.002  # seconds of CPU per reply in the "parse" scenario
BLOCK_EVERY, BLOCK = 100, 0.1  # the "blocking" scenario: every 100th item sleeps 0.1 s without awaiting


# -- the service ----------------------------------------------------------------------------------

REPLY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


class _Service(asyncio.Protocol):
    """One keep-alive connection: each request is answered DELAY seconds after it arrived. A bare
    protocol (no streams), so that the service costs little CPU beside the clients it serves."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        loop = asyncio.get_running_loop()
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            self.pending = self.pending[end + 4:]
            loop.call_later(DELAY, self.answer)

    def answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(REPLY)


async def _serve(port_file: str) -> None:
    server = await asyncio.get_running_loop().create_server(_Service, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    with open(port_file + ".tmp", "w") as out:
        out.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    async with server:
        await server.serve_forever()


def start_service(folder: str) -> tuple[subprocess.Popen[bytes], int]:
    port_file = os.path.join(folder, "port")
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.async_io", "--serve", port_file])
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError("the HTTP service did not start")
        time.sleep(0.02)
    with open(port_file) as text:
        return process, int(text.read())


# -- the clients ----------------------------------------------------------------------------------

class AsyncClient:
    """GET over keep-alive connections, reused (one pool per process and event loop)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> bytes:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        self.idle.append((reader, writer))
        return body

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


_clients: dict[tuple[int, int, int], AsyncClient] = {}  # (pid, loop, port) -> its client


def client_for(port: int) -> AsyncClient:
    key = (os.getpid(), id(asyncio.get_running_loop()), port)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = AsyncClient(port)
    return client


def parse(body: bytes, scenario: str) -> int:
    if scenario == "parse":  # 2 ms of CPU, whatever the thread does meanwhile
        until = time.thread_time() + PARSE
        while time.thread_time() < until:
            json.loads(body)
    return len(json.loads(body)["items"])


async def fetch(i: int, port: int, scenario: str) -> int:
    """One item: a request, its reply, what the scenario does with it."""
    if scenario == "blocking" and i % BLOCK_EVERY == 0:
        time.sleep(BLOCK)  # a blocking call inside a coroutine: its whole loop waits
    body = await client_for(port).get(f"/item/{i}")
    return parse(body, scenario)


_local = threading.local()


def fetch_blocking(i: int, port: int, scenario: str) -> int:
    """The same with a blocking client, one keep-alive connection per thread."""
    connection = getattr(_local, "connection", None)
    if connection is None or getattr(_local, "port", None) != port:
        connection = _local.connection = http.client.HTTPConnection("127.0.0.1", port)
        _local.port = port
    if scenario == "blocking" and i % BLOCK_EVERY == 0:
        time.sleep(BLOCK)
    connection.request("GET", f"/item/{i}")
    body = connection.getresponse().read()
    return parse(body, scenario)


_floor_loop: asyncio.AbstractEventLoop | None = None  # kept across runs, as the workers keep theirs
_thread_pools: dict[int, cf.ThreadPoolExecutor] = {}  # likewise: warm threads, open connections


def run_floor(items: int, port: int, scenario: str, concurrency: int) -> list[int]:
    global _floor_loop
    if _floor_loop is None:
        _floor_loop = asyncio.new_event_loop()

    async def main() -> list[int]:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with gate:
                return await fetch(i, port, scenario)

        return await asyncio.gather(*(one(i) for i in range(items)))

    return _floor_loop.run_until_complete(main())


def run_nbparallel(items: int, port: int, scenario: str, concurrency: int) -> list[int]:
    import nbparallel  # only this client needs it

    from benchmarks.async_io import fetch as by_reference  # not __main__'s: the workers import it by name

    return nbparallel.map(by_reference, range(items), [port] * items, [scenario] * items, concurrency=concurrency,
                          progress=False)


def run_threads(items: int, port: int, scenario: str, concurrency: int) -> list[int]:
    pool = _thread_pools.get(concurrency)
    if pool is None:
        pool = _thread_pools[concurrency] = cf.ThreadPoolExecutor(concurrency)
    return list(pool.map(fetch_blocking, range(items), [port] * items, [scenario] * items))


def run_joblib(items: int, port: int, scenario: str, concurrency: int) -> list[int]:
    import joblib  # only this client needs it

    return list(joblib.Parallel(n_jobs=concurrency, backend="threading")(
        joblib.delayed(fetch_blocking)(i, port, scenario) for i in range(items)))


CLIENTS = {"floor": run_floor, "nbparallel": run_nbparallel, "threads": run_threads, "joblib": run_joblib}
SCENARIOS = {"io": "io", "io + 2 ms parse": "parse", "blocking": "blocking"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each client (the best is shown)")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS.values()))
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the service's own process
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    import tempfile  # only the benchmark's parent needs a folder

    import nbparallel  # started before the timed runs, as after %load_ext

    nbparallel.status()  # starts the sidecar and its workers
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        service, port = start_service(folder)
        try:
            for title, scenario in SCENARIOS.items():
                if scenario not in args.scenarios.split(","):
                    continue
                row = results[title] = {}
                names = args.clients.split(",")
                for name in names:
                    CLIENTS[name](min(400, args.items), port, scenario, args.concurrency)  # warm-up
                for _ in range(args.repeats):
                    for name in names:
                        began = time.perf_counter()
                        out = CLIENTS[name](args.items, port, scenario, args.concurrency)
                        seconds = time.perf_counter() - began
                        assert out == [8] * args.items, f"{name} returned something else"
                        row[name] = min(seconds, row.get(name, seconds))
                        print(f"{title:>16}  {name:<11} {seconds:7.2f} s", file=sys.stderr, flush=True)
        finally:
            for pool in _thread_pools.values():
                pool.shutdown(wait=False)
            service.kill()
            service.wait()
            nbparallel.shutdown()
    report(results, args)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"items": args.items, "concurrency": args.concurrency, "repeats": args.repeats, "seconds": results,
                       "machine": machine()}, out, indent=2)


def machine() -> dict[str, Any]:
    import nbparallel.config as config  # the usable CPUs, as nbparallel counts them

    return {"python": platform.python_version(), "cpus": config.usable_cpus(), "host": socket.gethostname(),
            "load": os.getloadavg()}


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    info = machine()
    print(f"\n{args.items:,} requests, each answered after {DELAY * 1000:.0f} ms, {args.concurrency} in flight; "
          f"{info['cpus']} CPUs, load {info['load'][0]:.1f}; best of {args.repeats}; ratio = time / floor (lower is "
          "better)\n")
    names = [n for n in CLIENTS if any(n in row for row in results.values())]
    print("| scenario | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for title, row in results.items():
        floor = row.get("floor")
        cells = []
        for name in names:
            seconds = row.get(name)
            if seconds is None:
                cells.append("")
            elif floor:
                cells.append(f"{seconds:.2f} s ({seconds / floor:.2f}x)")
            else:
                cells.append(f"{seconds:.2f} s")
        print(f"| {title} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The message module against docs/protocol.md, without processes: every op the document lists has a
TypedDict and a builder, and every one the module has is documented; header fields match, required
and optional alike; builders make what their type says; the runners' handler tables take exactly the
kernel's ops; the slot reads back what was written."""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_type_hints

import pytest

from nbparallel.wire import messages as msg
from nbparallel.wire import worker_messages as wmsg
from nbparallel.wire.frames import FrameParser, encode
from nbparallel.wire.slot import SIZE, Slot, SlotState

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

#: docs/protocol.md's direction headings, and the registry each one is checked against.
DIRECTIONS = {
    "Kernel → sidecar": msg.TO_RUNNER,
    "Sidecar → kernel": msg.TO_KERNEL,
    "Sidecar → worker": wmsg.TO_WORKER,
    "Worker → sidecar": wmsg.FROM_WORKER,
}
#: Fields a builder fills in itself rather than taking as arguments.
FIXED = {"op", "version"}
#: Functions that make a message through its builder (so are not builders themselves).
HELPERS = {"unknown_op"}


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def _rows(body: str) -> list[list[str]]:
    """The body rows of the first table in a section, as cells."""
    rows = []
    for line in body.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # the header row goes


def _names(cell: str) -> list[str]:
    cell = re.sub(r"\([^)]*\)", "", cell)  # a field's values, in parentheses: `call` (`one`, ...)
    return re.findall(r"`([a-z_]+)`", cell)


def documented() -> dict[str, dict[str, tuple[set[str], set[str]]]]:
    """direction -> op -> (required fields, optional fields), from docs/protocol.md."""
    sections = _sections(DOC.read_text())
    out: dict[str, dict[str, tuple[set[str], set[str]]]] = {}
    for direction in DIRECTIONS:
        assert direction in sections, f"docs/protocol.md has no section '## {direction}'"
        ops: dict[str, tuple[set[str], set[str]]] = {}
        for cells in _rows(sections[direction]):
            (op,) = _names(cells[0])
            required, _, optional = cells[1].partition("optional")
            assert op not in ops, f"{direction}: {op!r} listed twice"
            ops[op] = (set(_names(required)), set(_names(optional)))
        out[direction] = ops
    return out


DOCUMENTED = documented()
CASES = [pytest.param(direction, op, id=f"{direction.replace(' → ', '-to-')}:{op}")
         for direction, registry in DIRECTIONS.items() for op in sorted(registry)]


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_the_document_and_the_module_list_the_same_ops(direction: str) -> None:
    assert set(DOCUMENTED[direction]) == set(DIRECTIONS[direction])


@pytest.mark.parametrize(("direction", "op"), CASES)
def test_the_documented_fields_are_the_typed_dicts_keys(direction: str, op: str) -> None:
    kind, _ = DIRECTIONS[direction][op]
    required, optional = DOCUMENTED[direction][op]
    assert set(kind.__required_keys__) - {"op"} == required, f"{kind.__name__}: required fields"
    assert set(kind.__optional_keys__) == optional, f"{kind.__name__}: optional fields"
    assert get_type_hints(kind)["op"] == Literal[op]


def _arguments(builder: Any, kind: Any) -> dict[str, Any]:
    """Made-up values for every argument the builder takes (every optional field too)."""
    parameters = inspect.signature(builder).parameters.values()
    names = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        names += sorted(kind.__optional_keys__)
    return {name: f"<{name}>" for name in names}


@pytest.mark.parametrize(("direction", "op"), CASES)
def test_each_builder_takes_its_fields_and_makes_its_message(direction: str, op: str) -> None:
    kind, builder = DIRECTIONS[direction][op]
    parameters = inspect.signature(builder).parameters.values()
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in parameters), "fields are passed by name"
    takes = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
    assert takes | FIXED >= set(kind.__required_keys__), f"{builder.__name__} cannot set every required field"
    assert takes <= set(kind.__required_keys__), f"{builder.__name__} takes a field that is not required"
    if kind.__optional_keys__:
        assert any(p.kind is p.VAR_KEYWORD for p in parameters), f"{builder.__name__} cannot set optional fields"

    every = _arguments(builder, kind)
    header = builder(**every)
    assert header["op"] == op
    assert set(header) == set(kind.__required_keys__) | set(kind.__optional_keys__)
    assert all(header[name] == value for name, value in every.items())
    if "version" in header:
        assert header["version"] == msg.PROTOCOL_VERSION
    least = {name: value for name, value in every.items() if name in kind.__required_keys__}
    assert set(builder(**least)) == set(kind.__required_keys__), "an optional field not passed is not sent"


@pytest.mark.parametrize(("direction", "op"), CASES)
def test_a_built_header_survives_the_wire_and_reads_back_as_its_type(direction: str, op: str) -> None:
    kind, builder = DIRECTIONS[direction][op]
    header = builder(**_arguments(builder, kind))
    (frame,) = FrameParser().feed(b"".join(bytes(p) for p in encode(header, [b"a", b"b"])))
    assert frame.op == op
    assert msg.view(frame, kind) == json.loads(json.dumps(header))


def test_one_builder_and_one_type_per_message() -> None:
    """Every TypedDict and builder in the module belongs to a documented message (and no two
    messages share a builder unless they are one message, forwarded: ``job``, ``end``)."""
    registered = {entry for registry in DIRECTIONS.values() for entry in registry.values()}
    types = {kind for kind, _ in registered}
    builders = {builder for _, builder in registered}
    for module in (msg, wmsg):
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, dict) and value.__module__ == module.__name__:
                if "op" in value.__annotations__:
                    assert value in types, f"{module.__name__}.{name} is in no registry, so in no table of protocol.md"
            elif inspect.isfunction(value) and value.__module__ == module.__name__ and name not in HELPERS:
                if inspect.signature(value).return_annotation in {k.__name__ for k in types}:
                    assert value in builders, f"{module.__name__}.{name} builds a message no registry lists"
    assert len(types) == len(builders) == len(registered)


def test_call_modes() -> None:
    assert msg.CALL_MODES == ("one", "star", "kwargs")
    assert re.search(r"`call` \(`one`, `star` or `kwargs`\)", DOC.read_text())


def test_unknown_op_is_a_protocol_error_naming_the_ops() -> None:
    error = msg.unknown_op("on_worker_exit", "sidecar")
    assert error["op"] == "error" and "fatal" not in error
    assert "protocol error" in error["message"] and "'on_worker_exit'" in error["message"]
    assert all(op in error["message"] for op in msg.TO_RUNNER)


def test_the_sidecar_takes_exactly_the_kernels_ops() -> None:
    from nbparallel.sidecar.loop import KERNEL_OPS  # the sidecar's loop: stdlib and our protocol

    assert set(KERNEL_OPS) == set(msg.TO_RUNNER)


def test_the_dask_bridge_takes_exactly_the_kernels_ops() -> None:
    pytest.importorskip("distributed")
    from nbparallel.cluster.bridge import KERNEL_OPS  # needs Dask (the test-dask extra)

    assert set(KERNEL_OPS) == set(msg.TO_RUNNER)
    rows = _rows(_sections(DOC.read_text())["The Dask bridge"])
    assert {_names(cells[0])[0] for cells in rows} == set(msg.TO_RUNNER), "the bridge's table in protocol.md"


def test_the_slot_reads_back_what_the_worker_wrote() -> None:
    fd = os.memfd_create("test-slot") if hasattr(os, "memfd_create") else None
    if fd is None:
        pytest.skip("no memfd here")
    try:
        sidecar = Slot.create(fd)
        worker = Slot.attach(fd)
        assert os.fstat(fd).st_size == SIZE == 32
        assert sidecar.read() == SlotState(chunk=-1, offset=-1, width=1, started=0.0)
        worker.write(started=12.5, chunk=7, offset=3, width=64)
        assert sidecar.read() == SlotState(7, 3, 64, 12.5)
        worker.write(offset=9, width=1)
        assert sidecar.read() == SlotState(7, 9, 1, 12.5)
        worker.close()
        sidecar.close()
    finally:
        os.close(fd)


def test_headers_are_mappings_the_frames_take() -> None:
    header: Mapping[str, Any] = msg.result(job=1, chunk=2, start=0, upto=3, n=3, failed=0, elapsed=0.1, final=True,
                                           pid=5)
    (frame,) = FrameParser().feed(b"".join(bytes(p) for p in encode(header, [b"x"])))
    assert msg.view(frame, msg.Result)["upto"] == 3 and "oob" not in frame.header

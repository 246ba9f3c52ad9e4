"""chatd uses its libraries through their public API only, so an upgrade
of any of them is a version bump, not a hunt through patched internals
(issue #14 item 5: chatd once called trio-websocket's ``_reader_task``,
``_get_request``, its stream lock and patched its close paths; the
server now speaks RFC 6455 itself, on a sans-IO library's public API).

These tests read chatd's source: they fail loudly, naming the file and
line, when someone reaches into a library's private parts again."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "chatd"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top != "chatd" and top not in sys.stdlib_module_names and top != "__future__"


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, alias.asname or alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node, f"{node.module}.{alias.name}", alias.asname or alias.name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_module_or_attribute_of_a_library_is_used(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    library_names: set[str] = set()
    problems = []
    for node, module, bound in _imports(tree):
        if not _third_party(module):
            continue
        library_names.add(bound)
        private = [part for part in module.split(".") if part.startswith("_")]
        if private:
            problems.append(f"{path.name}:{node.lineno} imports private {module}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in library_names):
            problems.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_attribute_of_another_object_is_used(path):
    # ``ws._wsproto``, ``stream._send_conflict_detector``: whatever the object
    # (a library's, or another chatd class's), its private parts are its own.
    tree = ast.parse(path.read_text(), filename=str(path))
    # A class's own module may name its private methods (a dispatch table).
    own = {"self", "cls"} | {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    problems = [f"{path.name}:{node.lineno} uses .{node.attr}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in own)]
    assert not problems, "\n".join(problems)


def test_the_server_does_not_depend_on_trio_websocket():
    # trio-websocket is the test suite's client; the server must not need it.
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, module, _ in _imports(tree):
            assert not module.startswith("trio_websocket"), f"{path.name}:{node.lineno}"


def test_no_library_method_is_patched():
    # Assigning to a library's class or module attribute (monkey-patching)
    # is how the old transport worked around trio-websocket's bugs.
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {bound for _, module, bound in _imports(tree) if _third_party(module)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    root = target
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    assert not (isinstance(target, ast.Attribute) and isinstance(root, ast.Name)
                                and root.id in names), f"{path.name}:{node.lineno} patches {root.id}"


def test_the_undocumented_parts_of_websockets_chatd_reads_still_behave():
    """``chatd/connection.py`` reads two attributes of websockets' sans-IO
    ``Protocol`` that its documentation does not list: ``close_rcvd`` (the
    peer's close frame, to echo its code) and ``parser_exc`` (why the
    parser stopped, to pick the close code: RFC 6455 section 7.4.1).
    pyproject.toml pins websockets to the major version they were tested
    on; this test fails, naming them, on a release that changes them."""
    from websockets.exceptions import ProtocolError
    from websockets.frames import Close, Frame, Opcode
    from websockets.protocol import SERVER, Protocol

    ws = Protocol(SERVER)
    assert ws.close_rcvd is None and ws.parser_exc is None
    ws.receive_data(Frame(Opcode.CLOSE, Close(4321, "bye").serialize()).serialize(mask=True))
    assert (ws.close_rcvd.code, ws.close_rcvd.reason) == (4321, "bye")

    ws = Protocol(SERVER)
    ws.receive_data(Frame(Opcode.TEXT, b"not masked").serialize(mask=False))
    assert isinstance(ws.parser_exc, ProtocolError)


def test_the_parser_state_a_parked_connection_reads_still_says_what_it_holds():
    """``chatd/connection.py`` lets a parked connection's parser go only
    when ``reader.buffer`` (bytes of a partial frame) is empty and
    ``current_size`` (a fragmented message under way) is None: neither is
    documented. If a release changes them, chatd keeps the parser (more
    memory, same behaviour); this test says so before memory grows."""
    from websockets.frames import Frame, Opcode
    from websockets.protocol import SERVER, Protocol

    ws = Protocol(SERVER)
    assert len(ws.reader.buffer) == 0 and ws.current_size is None
    frame = Frame(Opcode.TEXT, b"x" * 10).serialize(mask=True)
    ws.receive_data(frame[:3])  # a partial frame waits in the reader
    assert len(ws.reader.buffer) > 0
    ws.receive_data(frame[3:])
    assert len(ws.reader.buffer) == 0 and ws.current_size is None
    ws.receive_data(Frame(Opcode.TEXT, b"first", fin=False).serialize(mask=True))
    assert ws.current_size is not None  # a fragmented message under way

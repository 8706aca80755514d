"""The shape of src/klime: no import circle, and every import points down the layers.

Read from the code's own imports (``ast``; every ``import`` counts, inside functions and
``TYPE_CHECKING`` blocks too). The layers, bottom to top (docs/architecture.md):

0. model: configuration, errors, deadlines, events and batching, logging
1. runtime facts and process life; senders (WHERE); the spool's storage
2. delivery: splitting, counting, callbacks
3. transports (WHEN)
4. the face: ``Client`` and what it is made of
5. integrations and tools (Lambda, Cloud Functions, WSGI/ASGI, uWSGI, Celery, Flask, the
   CLI, the local collector, ``klime.testing``, ``klime.aws``)
6. the package ``klime`` itself (its public names)

A module may import its own layer's group, and anything below it. Hooks a lower layer runs
for a higher one are registered through an interface the lower one owns.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

#: (module or package prefix, layer, group) — the longest matching prefix wins.
LAYERS: List[Tuple[str, int, str]] = [
    ("klime._config", 0, "model"),
    ("klime._version", 0, "model"),
    ("klime._models", 0, "model"),
    ("klime.errors", 0, "model"),
    ("klime._deadline", 0, "model"),
    ("klime._events", 0, "model"),
    ("klime._batching", 0, "model"),
    ("klime._logging", 0, "model"),
    ("klime._retry", 0, "model"),
    ("klime._settings", 0, "model"),
    ("klime._wire_event", 0, "model"),
    ("klime._terminal", 0, "model"),
    ("klime.types", 0, "model"),
    ("klime._runtime", 1, "process"),
    ("klime._lifecycle", 1, "process"),
    ("klime._boto", 1, "senders"),
    ("klime.senders", 1, "senders"),
    ("klime.spool", 1, "spool"),
    ("klime._delivery", 2, "delivery"),
    ("klime._ledger", 2, "delivery"),
    ("klime.transports", 3, "transports"),
    ("klime._client", 4, "face"),
    ("klime._aio", 4, "face"),
    ("klime.client", 4, "face"),
    ("klime._default", 4, "face"),
    ("klime._backfill", 4, "face"),
    ("klime._import_run", 4, "face"),
    ("klime._import_formats", 0, "model"),
    ("klime._import_sources", 0, "model"),
    ("klime.integrations", 5, "top"),
    ("klime.cli", 5, "top"),
    ("klime.devserver", 5, "top"),
    ("klime.testing", 5, "top"),
    ("klime.aws", 5, "top"),
    ("klime", 6, "root"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "klime").rglob("*.py"))}


def imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The klime modules ``name`` imports (a package counts as its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names]
            submodules = [s for s in subs if s in known]
            # "from . import _config" imports the submodule, not the package's names
            targets = submodules if len(submodules) == len(subs) else [target, *submodules]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "import a.b.c" of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith("klime") and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> Tuple[int, str]:
    best = max((p for p in LAYERS if name == p[0] or name.startswith(p[0] + ".")), key=lambda p: len(p[0]))
    return best[1], best[2]


GRAPH = None


def graph() -> Dict[str, Set[str]]:
    global GRAPH
    if GRAPH is None:
        mods = modules()
        GRAPH = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    return GRAPH


def test_every_module_has_a_layer():
    assert all(layer_of(name) for name in graph())


def test_no_import_points_up_the_layers():
    upward = []
    for source, targets in graph().items():
        layer, group = layer_of(source)
        for target in targets:
            t_layer, t_group = layer_of(target)
            if t_layer > layer or (t_layer == layer and t_group != group and layer != 5):
                upward.append(f"{source} (layer {layer} {group}) -> {target} (layer {t_layer} {t_group})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    g = graph()
    cycles: List[List[str]] = []
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_each_module_says_what_it_is_for(name):
    """Modules are cut along seams, not to meet a line count (there is no cap); each one
    of any size says what it is for."""
    path = modules()[name]
    lines = path.read_text().count("\n")
    tree = ast.parse(path.read_text())
    if lines > 30:
        assert ast.get_docstring(tree), f"{name}: no module docstring"


# ---------------------------------------------------------------------------------------
# The delivery core's shape (issue 21): one backoff formula, one retry loop, one 413 rule,
# senders that make one attempt and call nobody back.


def _trees() -> Dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in modules().items()}


def test_one_backoff_formula():
    """Only klime._retry raises 2 to a power: every wait between attempts is its formula.
    (The local collector, a test server, is not the SDK's delivery: it is left out.)"""
    found = []
    for name, tree in _trees().items():
        if name == "klime._retry" or name.startswith("klime.devserver"):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Pow)
                and isinstance(node.left, ast.Constant)
                and node.left.value in (2, 2.0)
            ):
                found.append(f"{name}:{node.lineno}")
    assert not found, "exponential backoff written outside klime._retry: " + ", ".join(found)


def _functions(tree: ast.Module) -> List[ast.FunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def test_one_retry_loop_and_one_attempt_senders():
    """A sender's ``attempt`` makes one request: no loop, no sleep. No sender takes a hook
    from its caller (data flows down); the one retry loop is senders.base.send_with_retries."""
    trees = _trees()
    offenders = []
    for name, tree in trees.items():
        if not name.startswith("klime.senders"):
            continue
        for fn in _functions(tree):
            args = [a.arg for a in (*fn.args.args, *fn.args.kwonlyargs)]
            if "feedback" in args:
                offenders.append(f"{name}.{fn.name} takes a feedback hook")
            if fn.name == "attempt":
                for node in ast.walk(fn):
                    if isinstance(node, (ast.While, ast.For)):
                        offenders.append(f"{name}.attempt loops (line {node.lineno})")
                    if isinstance(node, ast.Attribute) and node.attr == "sleep":
                        offenders.append(f"{name}.attempt sleeps (line {node.lineno})")
            if fn.name == "send_attempts":
                offenders.append(f"{name}.send_attempts: a sender-side retry loop with hooks")
    assert not offenders, "\n".join(offenders)
    loops = [
        f"{name}.{fn.name}"
        for name, tree in trees.items()
        for fn in _functions(tree)
        if any(isinstance(n, ast.Attribute) and n.attr == "is_transient_status" for n in ast.walk(fn))
        and any(isinstance(n, ast.While) for n in ast.walk(fn))
    ]
    assert not loops, f"a retry loop besides senders.base.send_with_retries: {loops}"


def test_one_413_split():
    """A batch refused for its size is halved by senders.base.split_too_large only."""
    found = []
    for name, tree in _trees().items():
        if name == "klime.senders.base":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "too_large":
                found.append(f"{name}:{node.lineno}")
    allowed = {"klime._delivery"}  # it keeps a spool's exhausted batch, never splits
    offenders = [f for f in found if f.split(":")[0] not in allowed]
    assert not offenders, "code reading too_large outside the one split rule: " + ", ".join(offenders)


def test_one_place_builds_a_flush_result_with_counts():
    """Only klime._ledger builds a FlushResult that says what was sent, failed or dropped;
    elsewhere a FlushResult is empty or says only what is left unsent."""
    found = []
    for name, tree in _trees().items():
        if name == "klime._ledger":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "FlushResult"
                and (node.args or {k.arg for k in node.keywords} & {"sent", "failed", "dropped"})
            ):
                found.append(f"{name}:{node.lineno}")
    assert not found, "FlushResult counts built outside the ledger: " + ", ".join(found)


_DECLARING_KINDS = {"NamedTuple", "Protocol", "TypedDict"}  # bases whose annotations are their fields


def _name_of(node: ast.expr) -> str:
    if isinstance(node, ast.Subscript):  # Protocol[T], Generic[T]
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _assigned_attributes(cls: ast.ClassDef) -> Set[str]:
    """Names the class's own code assigns on ``self``/``cls`` (or with ``setattr``)."""
    assigned: Set[str] = set()
    for node in ast.walk(cls):
        targets: List[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and _name_of(node.func) in ("setattr", "__setattr__"):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            assigned.update(names[:1])
        while targets:
            target = targets.pop()
            if isinstance(target, (ast.Tuple, ast.List)):
                targets.extend(target.elts)
            elif isinstance(target, ast.Starred):
                targets.append(target.value)
            elif (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id in ("self", "cls")
            ):
                assigned.add(target.attr)
    return assigned


def test_no_class_declares_attributes_it_never_sets():
    """The mixin smell: a class that declares (an annotation without a value, in its body)
    an attribute that only its host sets. Each class sets what it declares; another
    object's state is reached through a component with an explicit interface.
    Dataclasses, NamedTuples, TypedDicts and Protocols (annotations are their fields or
    their interface) and ``TYPE_CHECKING`` blocks (not in the class body itself) are left out."""
    found = []
    for name, tree in _trees().items():
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            decorators = [d.func if isinstance(d, ast.Call) else d for d in cls.decorator_list]
            if any(_name_of(d) == "dataclass" for d in decorators):
                continue
            if any(_name_of(base) in _DECLARING_KINDS for base in cls.bases):
                continue
            declared = [
                (stmt.target.id, stmt.lineno)
                for stmt in cls.body
                if isinstance(stmt, ast.AnnAssign)
                and stmt.value is None
                and isinstance(stmt.target, ast.Name)
            ]
            if not declared:
                continue
            assigned = _assigned_attributes(cls)
            found += [f"{name}:{line} {cls.name}.{attr}" for attr, line in declared if attr not in assigned]
    assert not found, "attributes declared by a class that never sets them: " + ", ".join(found)


# ---------------------------------------------------------------------------------------
# The public surface is what the docs document (issue 21): a module is public when no part
# of its dotted path starts with "_"; its public names are its ``__all__``, which every
# public module has; each of them is named somewhere in README.md or docs/.

ROOT = SRC.parent


def _public_modules() -> List[str]:
    return sorted(
        name
        for name in modules()
        if not any(part.startswith("_") for part in name.split(".")[1:])
    )


def _documented_text() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text() for page in pages)


@pytest.mark.parametrize("name", _public_modules())
def test_the_public_surface_is_what_the_docs_document(name):
    import importlib
    import re

    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name}: a public module without __all__"
    text = _documented_text()
    undocumented = [n for n in exported if not re.search(r"\b" + re.escape(n) + r"\b", text)]
    missing = ", ".join(undocumented)
    assert not undocumented, f"{name}: public but in no doc (document them, or make them private): {missing}"


#: The modules one ``track()`` crosses with the default transport, as docs/architecture.md
#: draws them ("How an event flows from track to the wire"): at most six (issue 21).
EVENT_PATH = {
    "klime._client",  # validate, encode (below), hand over
    "klime._events",  # encoded once to JSON bytes
    "klime.transports.background",  # the queue, and the sender thread's loop
    "klime._delivery",  # split to the sender's limits, count, callbacks
    "klime.senders.base",  # the one retry loop
    "klime.senders.http",  # one attempt: the request, its wall-clock bound, the answer
}


def test_one_event_reaches_the_socket_through_at_most_six_modules():
    """Measured, not declared: every klime function the caller's thread runs during one
    ``track()``, and the klime modules on the sender thread's stack at the moment its
    bytes are written to the socket (a real collector on 127.0.0.1)."""
    import sys
    import threading

    import klime
    from klime.devserver import Collector

    def klime_module(frame) -> str:
        name = frame.f_globals.get("__name__", "")
        return name if name == "klime" or name.startswith("klime.") else ""

    on_the_wire: List[Set[str]] = []

    def sender_profile(frame, event, arg):
        if event != "c_call" or getattr(arg, "__name__", "") not in ("sendall", "send"):
            return
        if not isinstance(getattr(arg, "__self__", None), __import__("socket").socket):
            return
        if not threading.current_thread().name.startswith("klime-sender"):
            return  # the collector's own threads
        stack: Set[str] = set()
        while frame is not None:
            stack.add(klime_module(frame))
            frame = frame.f_back
        on_the_wire.append(stack - {""})

    on_the_caller: Set[str] = set()

    def caller_profile(frame, event, arg):
        if event == "call":
            on_the_caller.add(klime_module(frame))

    with Collector() as collector:
        threading.setprofile(sender_profile)  # for the sender threads, started below
        try:
            client = klime.Client(write_key="k", endpoint=collector.url, flush_interval=50)
            client.track("warm up", user_id="u")  # starts the sender thread
            assert client.flush(5).unsent == 0
            on_the_wire.clear()
            sys.setprofile(caller_profile)
            try:
                client.track("one event", user_id="u")
            finally:
                sys.setprofile(None)
            assert client.flush(5).unsent == 0
            client.shutdown(5)
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]
        assert collector.wait_for_events(2, timeout=5)
    assert on_the_wire, "no socket write seen on a sender thread"
    path = (on_the_caller - {""}).union(*on_the_wire)
    assert path == EVENT_PATH, f"the path of one event changed: {sorted(path)} (update docs/architecture.md)"
    assert len(path) <= 6


def test_the_queued_transports_are_one_pump_over_a_queue():
    """BackgroundTransport and SpoolTransport are configurations of one Pump: each builds
    its queue and overrides nothing; the spool transport is no background transport; both
    queues implement the whole queue interface."""
    from klime.transports.background import BackgroundTransport, BatchQueue, MemoryQueue, Pump
    from klime.transports.spooled import SpoolQueue, SpoolTransport

    assert not issubclass(SpoolTransport, BackgroundTransport)
    for cls in (BackgroundTransport, SpoolTransport):
        assert cls.__bases__ == (Pump,), cls
        own = sorted(n for n, v in vars(cls).items() if callable(v) and n != "__init__")
        assert not own, f"{cls.__name__} overrides the pump: {own}"
    interface = sorted(  # the queue interface, with what it inherits (BatchSource: the pump's loop)
        {
            n
            for proto in BatchQueue.__mro__
            if proto.__module__ == BatchQueue.__module__
            for n, v in vars(proto).items()
            if callable(v) and not n.startswith("_")
        }
    )
    assert {"take_locked", "takeable_locked", "send", "begin_flush", "close"} <= set(interface)
    for queue in (MemoryQueue, SpoolQueue):
        missing = [n for n in interface if not callable(getattr(queue, n, None))]
        assert not missing, f"{queue.__name__} lacks {missing}"


def test_the_pump_never_asks_whether_the_spool_fell_back():
    """Falling back to memory is the spool queue handing its calls to its memory queue, not
    a question the pump asks."""
    text = (SRC / "klime" / "transports" / "background.py").read_text()
    assert "degraded" not in text


#: Calls that take a batch off a queue (or ask the pump's loop for one), and calls that fly one.
_TAKES_A_BATCH = {"take_locked", "take_deferred_locked", "mark_sending_locked", "next_batch", "_next"}
_FLIES_A_BATCH = {"send", "fly", "_fly"}


def test_one_loop_takes_batches_and_flies_them():
    """Background, spool, the caller's thread where no thread may run and the invocation's
    flush all fly batches through the pump's one loop, ``background.fly_batches``: it is the
    only loop in the SDK that takes batches and flies them, and no module but background.py
    takes batches in a loop at all (a known set of batches is a small queue the pump's
    on-demand drain takes from, not a loop of its own)."""
    takers: Set[str] = set()
    flyers: Set[str] = set()
    the_loop: Set[str] = set()
    for name, tree in _trees().items():
        for fn in _functions(tree):
            for loop in ast.walk(fn):
                if not isinstance(loop, (ast.While, ast.For)):
                    continue
                where = f"{name}:{loop.lineno}"
                if name == "klime.transports.background" and fn.name == "fly_batches":
                    the_loop.add(where)
                called = {_name_of(c.func) for c in ast.walk(loop) if isinstance(c, ast.Call)}
                if called & _TAKES_A_BATCH:
                    takers.add(name)
                    if called & _FLIES_A_BATCH:
                        flyers.add(where)
    assert len(the_loop) == 1, the_loop
    others = sorted(flyers - the_loop)
    assert flyers == the_loop, f"loops that take batches and fly them besides the pump's: {others}"
    outside = sorted(takers - {"klime.transports.background"})
    assert not outside, f"batches taken in a loop outside the pump's module: {outside}"
    assert takers == {"klime.transports.background"}


def test_the_concurrency_limit_has_no_time_thresholds():
    # Issue 21: how many requests go at once is derived from what is measured (round trips,
    # CPU time per attempt, in-flight counts, the backlog), not from round-trip thresholds
    # tuned on one machine. The limit reads no clock of its own and names no constant in
    # seconds or milliseconds; its constants are shares and counts.
    path = SRC / "klime" / "transports" / "_limit.py"
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not imported & {"time", "monotonic", "perf_counter", "process_time", "thread_time"}
    constants = [
        target.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id.lstrip("_").isupper()
    ]
    assert constants, "no module constants found: the test reads the wrong file"
    timed = [name for name in constants if name.endswith(("_S", "_MS", "_SECONDS"))]
    assert timed == [], f"round-trip thresholds in the limit: {timed}"

"""The code's shape, checked: no import circle, the library names nothing of NoETL nor of Kafka, the targets are told
apart only by the factory, and the durable consume loop needs no faust app. (No services: the fast tier.)"""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("keychain", "streams", "devtools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The project's modules this module imports anywhere: at load, inside functions, for type checking alike (a
    circle is a circle of concepts whether or not Python tolerates it at run time)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {m for m in found if m in known and m != name}


def test_no_module_imports_itself_through_others():
    mods = modules()
    graph = {name: imported(path, name, set(mods)) for name, path in mods.items()}
    cycles = []

    def walk(node: str, stack: list[str], state: dict[str, int]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt], state)
        state[node] = 2

    state: dict[str, int] = {}
    for name in sorted(graph):
        if name not in state:
            walk(name, [name], state)
    assert not cycles, f"import circles: {cycles}"
    assert "keychain.store" in graph and graph["keychain.store"]  # the graph was built


def code_of(path: Path) -> str:
    """A module's code without its comments and docstrings."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_the_library_names_nothing_of_noetl_nor_of_kafka():
    library = [p for p in (ROOT / "keychain").rglob("*.py")]
    assert len(library) > 15
    for path in library:
        code = code_of(path).lower()
        for word in ("noetl", "kafka", "faust", "aiokafka"):
            assert word not in code, f"{path.relative_to(ROOT)} names {word}"
    statements = (ROOT / "keychain" / "sql" / "queries.sql").read_text().lower()
    assert "noetl" not in statements and "kafka" not in statements


def test_targets_are_told_apart_by_the_factory_only():
    for path in (ROOT / "streams").rglob("*.py"):
        if path == ROOT / "streams" / "targets" / "__init__.py":
            continue
        assert not re.search(r"isinstance\([^)]*(KeychainTarget|NoetlTarget)", code_of(path)), path.relative_to(ROOT)


def test_the_durable_consume_loop_loads_without_building_the_faust_app():
    probe = ("import sys; from streams.durable import consume_durably; "
             "assert 'faust' not in sys.modules and 'streams.app' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_dead_code_is_gone():
    names = {"NO_VALUE_CHANGE": ROOT / "streams" / "notices.py", "TARGET_NAMES": ROOT / "streams" / "targets",
             "settings_from_env()": ROOT / "keychain" / "settings.py", "def delete(": ROOT / "keychain",
             "def purge_execution": ROOT / "keychain", "invalidate_matching": ROOT / "keychain"}
    for name, where in names.items():
        files = [where] if where.is_file() else list(where.rglob("*.py"))
        assert not [f for f in files if name in f.read_text()], name

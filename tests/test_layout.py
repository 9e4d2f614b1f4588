"""The package's layout holds (README, "Layout"): every module imports only from its own floor and
the floors below, no modules import each other around a circle, and no two modules share a name.
Read from the modules' own import statements (function-level and type-checking ones included)
with `ast`; nothing is imported."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "agentsd"
# The floors, lowest first; a module may import from its own floor and the floors below it.
LAYERS = (
    ("agentsd.core",),
    ("agentsd.processors",),
    ("agentsd.families",),
    ("agentsd.api", "agentsd"),  # the package's own __init__ re-exports the public API
    ("agentsd.testing",),
    ("agentsd.bench",),
    ("agentsd.cli", "agentsd.__main__"),
    ("agentsd.suite",),
)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` (file `path`) imports anywhere."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target in known and target != name}


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def floor(name: str) -> int:
    """The floor of a module: that of the longest prefix in LAYERS it falls under."""
    matches = [
        (len(prefix), level)
        for level, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} is on no floor: give its folder a place in LAYERS and in the README's Layout"
    return max(matches)[1]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other around a circle (Tarjan's strongly connected
    components of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert circles(graph()) == []


def test_every_module_imports_only_from_its_floor_and_below():
    upward = [
        f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if floor(target) > floor(name)
    ]
    assert upward == []


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for name in modules():
        names.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    assert {short: found for short, found in names.items() if len(found) > 1} == {}


@pytest.mark.parametrize(
    "files, circle",
    [
        ({"a.py": "from . import b", "b.py": "from .c import x", "c.py": "def f():\n    from .a import y"}, "abc"),
        ({"a.py": "from . import b", "b.py": "import math", "c.py": "from .a import y"}, ""),
    ],
    ids=["through-a-function", "none"],
)
def test_the_circle_check_sees_every_import(tmp_path, files, circle):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for file, text in files.items():
        (root / file).write_text(text + "\n")
    assert circles(graph(root)) == ([[f"pkg.{m}" for m in circle]] if circle else [])


def test_the_floor_check_orders_the_layers():
    assert floor("agentsd.core.merge") < floor("agentsd.processors.joint_attention") < floor("agentsd.families.sd3")
    assert floor("agentsd.families.sd3") < floor("agentsd.api.patch") == floor("agentsd")
    assert floor("agentsd.api.status") < floor("agentsd.cli.compare") < floor("agentsd.suite.runner")


def test_the_readme_layout_names_every_module():
    """The README's map of the house ("Layout") names every module file and folder of the package."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    missing = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and f"`{path.name}`" not in layout
    )
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert missing == [] and [f for f in folders if f"{f}/" not in layout] == []

"""The package's layers: every lorakit import (at module level or inside a function) goes down or sideways within its
own sub-package, `sd/` never imports `llm/` (nor the reverse), and there are no import cycles."""

import ast
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent
# lower numbers are lower layers; a module may import its own layer (same package) or lower ones
LAYERS = {"lorakit.core": 0, "lorakit.options": 1, "lorakit.formats": 1, "lorakit.algebra": 2, "lorakit.runner": 2, "lorakit.dataset": 2,
          "lorakit.analysis": 3, "lorakit.llm": 4, "lorakit.sd": 4, "lorakit.merged": 5, "lorakit.push": 5, "lorakit.cli": 6, "lorakit": 7}


def module_name(path: Path) -> str:
    parts = ["lorakit", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the lorakit modules it imports anywhere in its source}."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorakit"):
                assert node.level == 0, f"{name}: relative import; lorakit imports are absolute"
                for alias in node.names:  # `from lorakit.sd import digits` imports the module lorakit.sd.digits
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("lorakit")}
        graph[name] = found - {name}
    return graph


def layer(module: str) -> tuple[str, int]:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return key, LAYERS[key]


def test_every_module_has_a_layer():
    assert all(layer(m) for m in imports())


def test_imports_go_down_and_sd_and_llm_stay_apart():
    wrong = []
    for a, targets in imports().items():
        for b in targets:
            (pa, la), (pb, lb) = layer(a), layer(b)
            if lb > la or (lb == la and pa != pb):
                wrong.append(f"{a} -> {b}")
    assert not wrong, wrong


def test_there_are_no_import_cycles():
    graph, state, cycles = imports(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_readme_layout_table_matches_the_tree():
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Known limits")]
    listed = set(re.findall(r"^\| `([\w/]+\.py)`", table, re.M))
    listed |= {f"formats/{name}.py" for name in re.findall(r"`(\w+)`", table.split("one module per format")[1].split("|")[0])}
    tree = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if p.name != "__init__.py"}
    assert listed == tree, (sorted(tree - listed), sorted(listed - tree))

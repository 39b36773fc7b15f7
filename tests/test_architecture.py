"""The architecture's rules, checked on the source (docs/design.md §2):

- imports run one way: the package's import graph (function-level imports included) has no cycle;
- the network (`model.py`, `cache.py`) imports no generation, training or front-end code;
- no module but `cache.py` assigns a cache's lengths;
- the Hugging Face export ships only the modules inference needs.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "poegpt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its source (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:      # `poegpt.corpus.build.x` -> the module that holds it
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its submodules is not a cycle of the design: drop the edges from a
    # submodule up to its own package __init__ (Python resolves them to the already-loading package)
    for name, deps in g.items():
        g[name] = {d for d in deps if not name.startswith(d + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", ["poegpt.model", "poegpt.cache"])
def test_the_network_imports_no_generation_or_training_code(module):
    allowed = {"poegpt.cache", "poegpt.config", "poegpt.errors", "poegpt.logop"}
    assert graph()[module] <= allowed, graph()[module] - allowed


def test_only_the_cache_writes_lengths():
    writers = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                t = t.value if isinstance(t, ast.Subscript) else t
                if isinstance(t, ast.Attribute) and t.attr == "lengths" and name != "poegpt.cache":
                    writers.append(f"{name}:{node.lineno}")
    assert not writers, f"cache lengths assigned outside poegpt/cache.py: {writers}"


def test_hf_export_ships_inference_modules_only():
    pytest.importorskip("transformers")
    from poegpt.integrations.hf.export import remote_sources
    shipped = {n[len("poegpt_"):-3] for n in remote_sources() if n.startswith("poegpt_")}
    assert {"model", "cache", "engine", "modes", "api"} <= shipped
    assert not shipped & {"objectives", "optim", "train", "data", "distributed", "checkpoint", "tokenizer", "cli"}, shipped

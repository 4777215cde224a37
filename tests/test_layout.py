"""The layout rules of docs/DESIGN.md section 2: line budgets, no grab-bag module, and an import graph that is a
tree (no circle, no import of another module's private names)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"train.py": 450, "sample.py": 200, "eval.py": 200}  # everything in nanovalor/: 600
SCRIPTS = [ROOT / name for name in BUDGETS]


def test_line_budgets():
    files = sorted((ROOT / "nanovalor").glob("*.py")) + SCRIPTS
    over = []
    for path in files:
        if not path.exists():
            continue
        n = len(path.read_text().splitlines())
        cap = BUDGETS.get(path.name if path.parent == ROOT else "", 600)
        if n > cap:
            over.append(f"{path.relative_to(ROOT)}: {n} lines > {cap}")
    assert not over, "over the line budget of docs/DESIGN.md section 2:\n" + "\n".join(over)


def test_no_utils_grab_bag():
    assert not (ROOT / "nanovalor" / "utils.py").exists(), "docs/DESIGN.md section 2: no grab-bag utils.py"


def imports(path):
    """{nanovalor module imported anywhere in `path` (lazy imports included): [names taken from it]}."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanovalor."):
            out.setdefault(node.module.split(".")[1], []).extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "nanovalor":
            for a in node.names:
                out.setdefault(a.name, [])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("nanovalor."):
                    out.setdefault(a.name.split(".")[1], [])
    return out


def cycles(modules):
    """Import circles in {module: {imported module: names}}, each as a path that returns to its start."""
    def cycle_from(path):  # depth-first: the first path that comes back to a module already on it
        for dep in modules.get(path[-1], {}):
            if dep in path:
                return path[path.index(dep):] + [dep]
            if found := cycle_from(path + [dep]):
                return found
        return None
    return [c for m in sorted(modules) if (c := cycle_from([m]))]


def test_imports_form_a_tree_without_private_names():
    modules = {p.stem: imports(p) for p in (ROOT / "nanovalor").glob("*.py") if p.stem != "__init__"}
    private = [f"{user} imports {name} from {module}" for user, deps in modules.items()
               for module, names in deps.items() for name in names if name.startswith("_") and module != user]
    private += [f"{p.name} imports {name} from {module}" for p in SCRIPTS for module, names in imports(p).items()
                for name in names if name.startswith("_")]
    assert not private, "private names imported across modules:\n" + "\n".join(private)
    found = cycles(modules)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_checks_can_fail(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from nanovalor.b import x\nfrom nanovalor.c import _hidden\n")
    assert imports(tmp_path / "a.py") == {"b": ["x"], "c": ["_hidden"]}  # lazy imports count too
    assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}})[0] == ["a", "b", "c", "a"]
    assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {}}) == []

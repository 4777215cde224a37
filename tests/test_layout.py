"""The line budgets of DESIGN.md section 2: each module stays readable in one sitting.

    python -m pytest -q tests/test_layout.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"train.py": 450, "sample.py": 200, "eval.py": 200}  # everything in nanovalor/: 600


def test_line_budgets():
    files = sorted((ROOT / "nanovalor").glob("*.py")) + [ROOT / name for name in BUDGETS]
    over = []
    for path in files:
        if not path.exists():
            continue
        n = len(path.read_text().splitlines())
        cap = BUDGETS.get(path.name if path.parent == ROOT else "", 600)
        if n > cap:
            over.append(f"{path.relative_to(ROOT)}: {n} lines > {cap}")
    assert not over, "over the line budget of DESIGN.md section 2:\n" + "\n".join(over)


def test_no_utils_grab_bag():
    assert not (ROOT / "nanovalor" / "utils.py").exists(), "DESIGN.md section 2: no grab-bag utils.py"

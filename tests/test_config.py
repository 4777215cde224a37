"""The --field=value parser of the entry scripts.

    python -m pytest -q tests/test_config.py
"""
from dataclasses import dataclass, field

import pytest

from nanovalor.config import checked, diff, parse


@dataclass
class Cfg:
    stage: str = "text"
    lr: float = 1e-6
    steps: int = 100
    fsdp: bool = False
    resume: str | None = None
    image: list[str] = field(default_factory=list)


def test_overrides_and_types():
    c = parse(Cfg, ["--stage=visual", "--lr", "3e-5", "--steps=7", "--fsdp", "--image", "a.png", "--image=b.png"])
    assert (c.stage, c.lr, c.steps, c.fsdp, c.resume, c.image) == ("visual", 3e-5, 7, True, None, ["a.png", "b.png"])
    assert parse(Cfg, ["--resume=out/x", "--fsdp=false"]).resume == "out/x"
    assert diff(parse(Cfg, ["--steps=7", "--stage=text"])) == {"steps": 7}


@pytest.mark.parametrize("argv,message", [
    (["--stpes=3"], "unknown option --stpes"),
    (["--steps=three"], "--steps=three: expected int"),
    (["--fsdp=maybe"], "expected a boolean"),
    (["visual"], "unexpected argument 'visual'"),
    (["--lr"], "--lr: missing value"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(Cfg, argv)


def test_checked_exits_with_the_message():
    assert checked(int, "7") == 7
    with pytest.raises(SystemExit, match=r"^error: unknown option --stpes"):
        checked(parse, Cfg, ["--stpes=3"])
    with pytest.raises(SystemExit, match=r"^error: .*no-such-file"):
        checked(open, "no-such-file")
    with pytest.raises(KeyError):  # not bad input: a bug, with its traceback
        checked({}.__getitem__, "x")


@pytest.mark.parametrize("script", ["train.py", "eval.py", "sample.py"])
def test_every_script_lists_every_option_with_its_comment(script):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / script), "--help"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: python {root / script}"), done.stderr[-2000:]
    config = runpy_config(root / script)
    lines = done.stdout.splitlines()
    options = {line.split("=")[0].strip(): i for i, line in enumerate(lines) if line.startswith("  --")}
    assert set(options) == {f"--{f}" for f in config}
    undocumented = [o for o, i in options.items()  # the comment goes on the lines below the option
                    if i + 1 == len(lines) or not lines[i + 1].startswith("      ") or not lines[i + 1].strip()]
    assert undocumented == [], f"{script}: options without a comment in its Config: {undocumented}"


def runpy_config(path):
    """The field names of a script's Config, read from its source (importing train.py would start nothing, but
    sample.py and eval.py are scripts)."""
    import ast
    tree = ast.parse(path.read_text())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    return [n.target.id for n in config.body if isinstance(n, ast.AnnAssign)]

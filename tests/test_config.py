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

"""Atomic folders and files (checkpoint.atomic_folder, checkpoint.write_atomic): a reader or a crash never sees half
of one, and a failed write leaves the old one as it was and no temporary behind.

    python -m pytest -q tests/test_checkpoint.py
"""
import pytest

from nanovalor.checkpoint import atomic_folder, write_atomic


def _fill(files):
    def fill(path):
        assert list(path.iterdir()) == []  # fill always starts from an empty folder
        for name, text in files.items():
            (path / name).write_text(text)
    return fill


def test_atomic_folder_creates_and_replaces(tmp_path):
    target = tmp_path / "out" / "checkpoint"  # parents are made
    atomic_folder(target, _fill({"a.txt": "1", "b.txt": "2"}))
    atomic_folder(target, _fill({"a.txt": "3"}))  # replaces the whole folder: b.txt is gone
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "3"}
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint"]  # no temporary or old folder left


def test_atomic_folder_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "checkpoint"
    atomic_folder(target, _fill({"a.txt": "old"}))

    def failing(path):
        (path / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_folder(target, failing)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_atomic_folder_nested_in_its_own_fill(tmp_path):
    """checkpoint.save's fill calls policy.save / expert.save, themselves atomic, on the folder being filled."""
    target = tmp_path / "checkpoint"

    def outer(path):
        atomic_folder(path, _fill({"model.safetensors": "weights"}))
        (path / "trainer_state.pt").write_text("state")

    atomic_folder(target, outer)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "trainer_state.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_write_atomic(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "naïve\r\n")  # str: UTF-8, newlines as they are
    assert path.read_bytes() == "naïve\r\n".encode()
    write_atomic(path, b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"
    with pytest.raises(TypeError):
        write_atomic(path, 3)  # neither str nor bytes: the old file stays, no temporary is left
    assert path.read_bytes() == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


# A process that saves version 1, then dies (os._exit: no except or finally runs, as with kill -9) at one point of
# saving version 2: inside fill, or just before the n-th rename, or before the old copy is removed.
KILL = """
import os, pathlib, shutil, sys
from nanovalor.checkpoint import atomic_folder
target, point = pathlib.Path(sys.argv[1]), sys.argv[2]

def fill(version, die=False):
    def f(path):
        (path / "v.txt").write_text(version)
        if die:
            os._exit(9)
        (path / "w.txt").write_text(version)
    return f

atomic_folder(target, fill("1"))
renames, rename, rmtree = [0], pathlib.Path.rename, shutil.rmtree
def counted(self, new):
    renames[0] += 1
    if point == f"rename{renames[0]}":
        os._exit(9)
    return rename(self, new)
pathlib.Path.rename = counted
shutil.rmtree = lambda *a, **k: os._exit(9) if point == "rmtree" else rmtree(*a, **k)
atomic_folder(target, fill("2", die=point == "fill"))
"""


@pytest.mark.parametrize("point,survivor", [("fill", "1"), ("rename1", "1"), ("rename2", "2"), ("rename3", "2"),
                                            ("rmtree", "2"), ("none", "2")])
def test_a_kill_at_any_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, point, survivor):
    """rename1: tmp -> ready; rename2: the old folder aside; rename3: ready -> the folder. Before rename1 the new
    copy may be half written and the old one wins; from then on the new one is complete and wins."""
    import subprocess
    import sys
    from pathlib import Path

    from nanovalor.checkpoint import recover
    target = tmp_path / "checkpoint"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", KILL, str(target), point], cwd=root, capture_output=True, text=True)
    assert done.returncode == (0 if point == "none" else 9), done.stderr
    message = recover(target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"v.txt": survivor, "w.txt": survivor}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # every leftover removed
    assert (message != "") == (point != "none")
    assert recover(target) == ""  # nothing left to do


def test_lock_refuses_a_second_writer(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from nanovalor.checkpoint import lock
    handle = lock(tmp_path / "run")
    code = "import sys; from nanovalor.checkpoint import lock; lock(sys.argv[1])"
    root = Path(__file__).resolve().parents[1]
    second = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=root, capture_output=True,
                            text=True)
    assert second.returncode != 0 and "in use by another train.py run" in second.stderr
    handle.close()  # released: the next writer gets it
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=root).returncode == 0

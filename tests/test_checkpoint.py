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

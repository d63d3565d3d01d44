import os
import stat

import pytest

from kandinsky5.atomic import atomic_write, atomic_write_folder


def test_atomic_write_creates_parents_and_respects_umask(tmp_path):
    dest = tmp_path / "a" / "b" / "out.txt"
    atomic_write(dest, lambda tmp: tmp.write_text("hello"))
    assert dest.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dest, fail)
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_write_removes_the_folders_it_created(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new" / "deeper" / "x.bin", lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_folder_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "model"

    def write(files):
        def fill(folder):
            folder.mkdir()
            for name, text in files.items():
                (folder / name).write_text(text)

        return fill

    atomic_write_folder(dest, write({"a.json": "1", "b.bin": "2"}))
    atomic_write_folder(dest, write({"a.json": "3"}))
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a.json": "3"}

    def broken(folder):
        write({"a.json": "4"})(folder)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(dest, broken)
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"a.json": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old folder left

"""replace_dir: the one way every command puts a finished output folder in place."""

from __future__ import annotations

import os

import pytest

from switchyard.files import replace_dir


def _folder(path, text):
    path.mkdir()
    (path / "f").write_text(text)
    return path


def test_new_output_is_renamed_into_place(tmp_path):
    tmp = _folder(tmp_path / "out.tmp", "new")
    assert replace_dir(tmp, tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "f").read_text() == "new" and not tmp.exists()


def test_existing_output_is_replaced_and_nothing_is_left_beside_it(tmp_path):
    _folder(tmp_path / "out", "old")
    replace_dir(_folder(tmp_path / "out.tmp", "new"), tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    _folder(tmp_path / "out", "old")
    tmp = _folder(tmp_path / "out.tmp", "new")
    real = os.rename

    def rename(src, dst):
        if str(src) == str(tmp):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        replace_dir(tmp, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "old"  # neither output lost
    assert (tmp / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]

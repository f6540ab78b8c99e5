"""staged_directory: what --force may replace (never the source, the current directory or
a symbolic link's target), and that a failed block or rename leaves the old directory whole."""

import os
from pathlib import Path

import pytest

from llama_dist import files
from llama_dist.errors import UserError
from llama_dist.files import staged_directory


def make_dir(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "file.txt").write_text(text)
    return path


def contents(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_completed_block_replaces_the_destination(tmp_path):
    dst = make_dir(tmp_path / "dst", "old")
    with staged_directory(dst, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert contents(tmp_path) == {"dst/new.txt": "new"}


def test_everything_the_block_wrote_is_on_disk_before_the_swap(tmp_path, monkeypatch):
    """The block's writers (safetensors, json) do not fsync: after a power cut just past the swap,
    the new directory must not hold empty files where the replaced one held whole ones."""
    synced = []
    monkeypatch.setattr(files, "fsync_path", lambda path: synced.append(Path(path)))
    real_swap = files._swap_in
    monkeypatch.setattr(files, "_swap_in", lambda tmp, dst: (synced.append("swap"), real_swap(tmp, dst)))
    with staged_directory(tmp_path / "dst") as tmp:
        (tmp / "a.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"x")
    before = synced[: synced.index("swap")]
    assert {tmp / "a.json", tmp / "sub" / "b.bin", tmp, tmp / "sub"} <= set(before)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_the_source_is_never_the_destination_nor_under_it(tmp_path, where):
    src = make_dir(tmp_path / "a" / "src", "source")
    dst = {"same": src, "parent": tmp_path / "a", "inside": src / "out"}[where]
    before = contents(tmp_path)
    with pytest.raises(UserError, match=r"overlaps the source .*; choose a directory outside it$"):
        with staged_directory(dst, force=True, source=src):
            pytest.fail("the block must not run")
    assert contents(tmp_path) == before


@pytest.mark.parametrize("dst", [".", "..", "/"])
def test_the_current_directory_and_those_above_it_are_refused(tmp_path, monkeypatch, dst):
    work = make_dir(tmp_path / "work", "mine")
    monkeypatch.chdir(work)
    with pytest.raises(UserError, match=r"^destination .* (holds the current directory|is the root)"):
        with staged_directory(dst, force=True):
            pytest.fail("the block must not run")
    assert contents(tmp_path) == {"work/file.txt": "mine"}


@pytest.mark.parametrize("target", ["a directory", "nothing"])
def test_a_symbolic_link_is_refused_and_its_target_kept(tmp_path, target):
    real = make_dir(tmp_path / "real", "kept") if target == "a directory" else tmp_path / "missing"
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UserError, match=r"^destination .*link is a symbolic link; give the directory itself$"):
        with staged_directory(link, force=True):
            pytest.fail("the block must not run")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert contents(tmp_path) == ({"real/file.txt": "kept"} if real.exists() else {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"link", "real"} if real.exists() else {"link"})


def test_a_failing_block_leaves_the_old_directory_and_no_leftovers(tmp_path):
    dst = make_dir(tmp_path / "dst", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_directory(dst, force=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert contents(tmp_path) == {"dst/file.txt": "old"}


def test_a_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    dst = make_dir(tmp_path / "dst", "old")
    real_replace, calls = os.replace, []

    def replace(a, b):
        calls.append((Path(a).name, Path(b).name))
        if len(calls) == 2:  # the finished directory onto DST's name
            raise OSError(5, "Input/output error")
        return real_replace(a, b)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        with staged_directory(dst, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert calls[0][0] == "dst" and calls[1][1] == "dst" and len(calls) == 3  # aside, in (failed), back
    assert contents(tmp_path) == {"dst/file.txt": "old"}


def test_a_destination_under_a_file_is_one_line_and_leaves_the_file(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(UserError, match=r"/afile/sub/deeper lies under .*/afile, which is a file, not a directory; "
                                        r"choose another destination$"):
        with staged_directory(tmp_path / "afile" / "sub" / "deeper"):
            pytest.fail("entered the block")
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

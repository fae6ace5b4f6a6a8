"""Folder entries that cannot be read are reported as skipped, with the reason, never dropped silently."""

import os

import numpy as np
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.io import batch
from supir_mlx.io.batch import collect_inputs


def _folder(tmp_path):
    d = tmp_path / "scans"
    d.mkdir()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(d / "good.png")
    (d / "gone.jpg").symlink_to(d / "deleted.jpg")  # broken link
    (d / "loop1.png").symlink_to(d / "loop2.png")  # link loop
    (d / "loop2.png").symlink_to(d / "loop1.png")
    os.mkfifo(d / "pipe.tif")  # reading it would block forever
    (d / "notes.txt").symlink_to(d / "nowhere.txt")  # not an image name: ignored, as any .txt
    sub = d / "sub"
    sub.mkdir()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(sub / "inner.png")
    (sub / "up").symlink_to(d)  # a folder link cycle: never followed
    return d


REASONS = {
    "gone.jpg": "broken symbolic link",
    "loop1.png": "symbolic link loop",
    "loop2.png": "symbolic link loop",
    "pipe.tif": "not a regular file",
}


def test_collect_reports_every_unreadable_entry(tmp_path):
    d = _folder(tmp_path)
    for recursive, images in ((False, ["good.png"]), (True, ["good.png", "inner.png"])):
        skipped = []
        found = collect_inputs([d], recursive, skipped=skipped)
        assert [p.name for p in found] == images
        assert {p.name: r.split(" (")[0] for p, r in skipped} == REASONS
    skipped = []
    assert [p.name for p in collect_inputs([str(d / "*")], skipped=skipped)] == ["good.png"]
    assert {p.name for p, _ in skipped} == set(REASONS)


def test_unlistable_folder_and_unreadable_file_are_reported(tmp_path, monkeypatch):
    d = _folder(tmp_path)
    real_scandir, real_access = os.scandir, os.access

    def scandir(path):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(batch.os, "scandir", scandir)
    monkeypatch.setattr(batch.os, "access", lambda p, m: not str(p).endswith("good.png") and real_access(p, m))
    skipped = []
    assert collect_inputs([d], True, skipped=skipped) == []
    reasons = {p.name: r for p, r in skipped}
    assert reasons["sub"] == "folder cannot be read (permission denied)"
    assert reasons["good.png"] == "cannot be read (permission denied)"


def test_batch_output_and_summary_count_them(weights, tmp_path):
    d = _folder(tmp_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["restore", str(d), "-o", str(out), "--weights", str(weights), "--prompt", "x",
                                  "--steps", "1", "--min-size", "64", "-q"])
    assert r.exit_code == 0, r.output
    for name, reason in REASONS.items():
        assert any(line.strip().startswith(f"skip {d / name}: {reason}") for line in r.output.splitlines()), r.output
    assert "1 done, 4 skipped (4 unreadable), 0 failed" in r.output
    assert [p.name for p in out.iterdir()] == ["good_supir.png"]
    r = CliRunner().invoke(main, ["restore", str(d), "-o", str(out), "--weights", str(weights), "--plan"])
    assert r.exit_code == 0 and f"skip {d / 'pipe.tif'}: not a regular file" in r.output
    # nothing readable at all: one line that says why
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.png").symlink_to(empty / "b.png")
    r = CliRunner().invoke(main, ["restore", str(empty), "--weights", str(weights)])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert f"no images found in {empty} ({empty / 'a.png'}: broken symbolic link" in r.output

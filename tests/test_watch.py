"""Watch folders: stable-file detection (events and polling), and `supir-mlx watch` as a real process: files dropped
while it runs, one written slowly, one bad, SIGTERM, a restart that redoes nothing, Ctrl-C abandoning an image."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supir_mlx import events
from supir_mlx.io.watch import FolderWatcher


def png_bytes(seed, size=(40, 30)) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def until(predicate, timeout=60.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


@pytest.mark.parametrize("use_events", [True, False])
def test_a_file_is_ready_once_it_stops_changing(tmp_path, use_events):
    old = tmp_path / "old.png"
    old.write_bytes(png_bytes(0))
    os.utime(old, (time.time() - 60, time.time() - 60))  # complete before the watch started: ready at once
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    with FolderWatcher(tmp_path, settle=0.6, poll=0.1, use_events=use_events) as w:
        assert ("events" in w.backend) == use_events
        assert w.ready() == [old]
        assert w.ready() == []  # handed out once
        growing = tmp_path / "growing.png"
        data = png_bytes(1)
        t_last = None
        with open(growing, "wb") as f:
            for i in range(0, len(data), len(data) // 4 + 1):
                f.write(data[i:i + len(data) // 4 + 1])
                f.flush()
                t_last = time.monotonic()
                assert growing not in w.ready()  # still being written
                time.sleep(0.25)
        got = []
        until(lambda: got.extend(w.ready()) or got, timeout=10)
        assert got == [growing] and time.monotonic() - t_last >= 0.6
        growing.write_bytes(png_bytes(2))  # a new version is handed out again
        until(lambda: w.ready() == [growing], timeout=10)


class Watch:
    """`supir-mlx watch` in its own process; its JSON events collected as they arrive."""

    def __init__(self, *args):
        cmd = [sys.executable, "-c", "from supir_mlx.cli import main; main()", "watch", *map(str, args), "--json"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events, self._q = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(json.loads(line))

    def drain(self):
        while not self._q.empty():
            self.events.append(self._q.get())
        return self.events

    def wait_for(self, kind, name, timeout=120):
        return until(lambda: next((e for e in self.drain() if e["event"] == kind and Path(e.get("input", "")).name == name),
                                  None), timeout)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        time.sleep(0.2)
        self.drain()
        return code


def test_watch_folder_end_to_end(weights, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    (inbox / "a.png").write_bytes(png_bytes(1))
    (inbox / "b.png").write_bytes(png_bytes(2))
    (out / "b_supir.png").write_bytes(b"finished by an earlier run")
    args = [inbox, "-o", out, "--weights", weights, "--prompt", "x", "--settle", "1"]
    fast, slow = ["--steps", "1", "--min-size", "64"], ["--steps", "4", "--min-size", "128"]
    w = Watch(*args, *fast)
    w.wait_for("result", "a.png")
    assert w.wait_for("skipped", "b.png")["reason"] == "output exists"
    # dropped while it runs: one complete file, one written slowly, one bad
    (inbox / "c.png").write_bytes(png_bytes(3))
    data = png_bytes(4)
    with open(inbox / "d.png", "wb") as f:
        for i in range(0, len(data), len(data) // 5 + 1):
            f.write(data[i:i + len(data) // 5 + 1])
            f.flush()
            time.sleep(0.3)
        last_write = time.time()
    (inbox / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    w.wait_for("result", "c.png")
    d = w.wait_for("start", "d.png")
    assert d["time"] >= last_write  # not touched before its writer finished
    w.wait_for("result", "d.png")
    assert "bad.png" in w.wait_for("error", "bad.png")["message"]
    assert w.stop(signal.SIGTERM) == 1  # a clean stop while idle; the status says an input failed
    assert "Traceback" not in "".join(w.stderr)
    for e in w.events:
        assert events.check(e) == [], e
    assert w.events[-1]["event"] == "summary" and w.events[-1]["done"] == 3 and w.events[-1]["failed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_supir.png", "b_supir.png", "c_supir.png", "d_supir.png"]
    Image.open(out / "d_supir.png").load()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # a restart redoes nothing finished and picks up what arrived meanwhile; Ctrl-C abandons the image in progress
    (inbox / "e.png").write_bytes(png_bytes(5, size=(64, 64)))
    w = Watch(*args, *slow)
    w.wait_for("start", "e.png")
    assert w.stop(signal.SIGINT) == 130
    kinds = {Path(e["input"]).name: e["event"] for e in w.events if "input" in e and e["event"] != "stage"}
    assert kinds == {"a.png": "skipped", "b.png": "skipped", "c.png": "skipped", "d.png": "skipped",
                     "bad.png": "error", "e.png": "start"}
    assert w.events[-1]["event"] == "summary" and w.events[-1]["interrupted"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == done_before  # nothing partial, nothing redone

    # --on-stop finish: the image in progress completes before the watch stops
    (inbox / "bad.png").unlink()
    w = Watch(*args, *slow, "--on-stop", "finish")
    w.wait_for("start", "e.png")
    signalled = time.time()
    assert w.stop(signal.SIGTERM, timeout=300) == 0, "".join(w.stderr)
    assert w.wait_for("result", "e.png", timeout=5)["time"] > signalled
    assert (out / "e_supir.png").is_file() and not [p for p in out.iterdir() if p.name.startswith(".")]

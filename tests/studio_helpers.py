"""A Studio served on 127.0.0.1 from a thread, over the tiny random-weight model, for the API and browser tests."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

FAST = {"steps": 2, "min_size": 64}


@contextlib.contextmanager
def running_studio(load, out: Path, work: Path, folder: Path | None = None, **kw):
    from supir_mlx.studio.engine import Studio
    from supir_mlx.studio.server import Server

    studio = Studio(load, out, work, folder, **kw).start()
    server = Server(studio, "test-token-0123456789", "127.0.0.1", 0).start()
    try:
        yield studio, server
    finally:
        server.stop()
        studio.stop()


def request(url: str, data: bytes | dict | None = None, method: str | None = None) -> tuple[int, dict | bytes]:
    body = json.dumps(data).encode() if isinstance(data, dict) else data
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            code, raw, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        code, raw, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    return code, json.loads(raw) if "json" in kind else raw


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def chart(path: Path, size=(48, 32)) -> Path:
    """A small colourful test photo (gradients + noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([xx * 5 % 256, yy * 7 % 256, (xx + yy) * 3 % 256], -1)
    Image.fromarray(np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)).save(path)
    return path

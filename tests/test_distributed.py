"""Work over several processes with mx.distributed: 2 ranks started by `mlx.launch --backend ring` on 127.0.0.1.

Batch sharding (every input restored exactly once, rank 0 reporting the combined summary and every rank's tagged
events; a rank killed mid-batch, then a rerun that redoes nothing and misses nothing) and one image whose sampling
tiles are divided between the ranks, bit-identical to the single-process result.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supir_mlx import distributed, events

LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
SUPIR = str(Path(sys.executable).parent / "supir-mlx")
FAST = ["--steps", "1", "--min-size", "64", "--prompt", "x"]


class FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_share_gives_every_item_to_exactly_one_rank():
    items = list(range(11))
    for size in (1, 2, 3, 5):
        parts = [distributed.share(items, FakeGroup(r, size)) for r in range(size)]
        assert sorted(sum(parts, [])) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def free_ports(n=2) -> int:
    """A starting port with n consecutive free ports (the ring backend listens on port, port + 1, ...)."""
    for _ in range(200):
        start = random.randint(20000, 60000)
        try:
            socks = []
            for p in range(start, start + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch(*command, marker=None):
    env = {**os.environ, **({"SUPIR_TEST_MARK": marker} if marker else {})}
    cmd = [*LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_ports()), *map(str, command)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def photos(folder: Path, n: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        paths.append(folder / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def decoded(stdout: str) -> list[dict]:
    out = [json.loads(line) for line in stdout.splitlines()]
    for e in out:
        assert events.check(e) == [], e
    return out


SCRIPT = """
import sys, numpy as np
from PIL import Image
from supir_mlx import Restorer
from supir_mlx.distributed import world
group = world()
assert group is not None and group.size() == 2
r = Restorer.from_weights(sys.argv[1])
res = r.restore(Image.open(sys.argv[2]), prompt="x", steps=2, min_size=64, tile_size=8, tile_stride=4,
                sampler=sys.argv[4], color_fix="none", group=group)
np.save(f"{sys.argv[3]}_{group.rank()}.npy", res.pixels[0])
"""


@pytest.mark.parametrize("sampler", ["edm", pytest.param("dpmpp", marks=pytest.mark.slow)])
def test_one_image_tiles_over_two_ranks_equal_the_single_process_bit_for_bit(weights, tmp_path, sampler):
    """A 128x64 working image has a 16x8 latent: 8-pixel tiles at stride 4 make 3 tiles, 2 on rank 0, 1 on rank 1."""
    from supir_mlx import Restorer

    (src,) = photos(tmp_path, 1, size=(128, 64))
    script = tmp_path / "tiles.py"
    script.write_text(SCRIPT)
    p = launch(sys.executable, script, weights, src, tmp_path / "out", sampler)
    _, err = p.communicate(timeout=600)
    assert (tmp_path / "out_1.npy").is_file(), err
    single = Restorer.from_weights(weights).restore(Image.open(src), prompt="x", steps=2, min_size=64, tile_size=8,
                                                    tile_stride=4, sampler=sampler, color_fix="none").pixels[0]
    for rank in (0, 1):
        assert np.array_equal(np.load(tmp_path / f"out_{rank}.npy"), single), rank


def test_batch_shared_over_two_ranks(weights, tmp_path):
    photos(tmp_path / "in", 4)
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (40, 30)).save(out / "p1_supir.png")  # finished before: nobody redoes it
    p = launch(SUPIR, "restore", tmp_path / "in", "-o", out, "--weights", weights, "--json", *FAST)
    stdout, stderr = p.communicate(timeout=600)
    evs = decoded(stdout)
    assert {e["rank"] for e in evs} == {0, 1}
    (plan,) = [e for e in evs if e["event"] == "plan"]
    (summary,) = [e for e in evs if e["event"] == "summary"]
    assert plan["rank"] == 0 and summary["rank"] == 0 and summary["ranks"] == plan["ranks"] == 2
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 1, 0)
    owners = {Path(i["input"]).name: i["rank"] for i in plan["items"]}
    assert owners == {"p0.png": 0, "p1.png": None, "p2.png": 1, "p3.png": 0}  # the pending ones, dealt in turn
    results = [e for e in evs if e["event"] == "result"]
    assert sorted(Path(e["input"]).name for e in results) == ["p0.png", "p2.png", "p3.png"]
    assert all(e["rank"] == owners[Path(e["input"]).name] for e in results)  # each restored once, by its owner
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}_supir.png" for i in range(4)]
    assert "3 done, 1 skipped, 0 failed (2 ranks)" in stderr


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the supir-mlx process of `rank` started with our marker (Linux /proc)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SUPIR_TEST_MARK={marker}".encode() in env and f"MLX_RANK={rank}".encode() in env and b"supir-mlx" in cmd:
            return int(d.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_mid_batch_then_a_rerun_redoes_nothing_and_misses_nothing(weights, tmp_path):
    photos(tmp_path / "in", 6)
    out = tmp_path / "out"
    args = ["restore", tmp_path / "in", "-o", out, "--weights", weights, "--json", *FAST]
    marker = uuid.uuid4().hex
    p = launch(SUPIR, *args, marker=marker)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    end = time.monotonic() + 600
    while not any('"result"' in line and '"rank":1' in line for line in list(lines)):
        assert time.monotonic() < end and p.poll() is None, "rank 1 never finished an image"
        time.sleep(0.1)
    os.kill(rank_pid(marker, 1), signal.SIGKILL)
    p.wait(timeout=300)
    reader.join(timeout=10)
    first = decoded("".join(lines))
    finished = {Path(e["output"]).name for e in first if e["event"] == "result"}
    assert finished and len(finished) < 6
    assert sorted(p.name for p in out.iterdir()) == sorted(finished)  # nothing partial, no temporary files
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    p = launch(SUPIR, *args)
    stdout, _ = p.communicate(timeout=600)
    second = decoded(stdout)
    redone = {Path(e["output"]).name for e in second if e["event"] == "result"}
    assert not redone & finished and redone | finished == {f"p{i}_supir.png" for i in range(6)}
    (summary,) = [e for e in second if e["event"] == "summary"]
    assert (summary["done"], summary["skipped"], summary["failed"]) == (6 - len(finished), len(finished), 0)
    assert all(stamps[n] == (out / n).stat().st_mtime_ns for n in finished)
    for n in redone | finished:
        Image.open(out / n).load()


VAE_SCRIPT = """
import sys, numpy as np, mlx.core as mx
from supir_mlx.config import VAEConfig
from supir_mlx.distributed import world
from supir_mlx.models.vae import AutoencoderKL
from supir_mlx.pipeline.tiled_vae import tiled_decode, tiled_encoder_features
group = world()
mx.random.seed(1)
vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
rng = np.random.default_rng(0)
z = mx.array(rng.normal(size=(1, 28, 24, 4)).astype(np.float32) * 0.13025)
x = mx.array(rng.uniform(-1, 1, (1, 112, 136, 3)).astype(np.float32))
np.save(f"{sys.argv[1]}_{group.rank()}.npy", np.concatenate([
    np.array(tiled_decode(vae, z, 4, group=group)).ravel(),
    np.array(tiled_decode(vae, z, 4, budget_bytes=1, group=group)).ravel(),  # tile states spilled to disk
    np.array(tiled_encoder_features(vae, x, 16, group=group)).ravel()]))
"""


@pytest.mark.slow
def test_tiled_vae_over_two_ranks_equals_the_single_process_bit_for_bit(tmp_path):
    """The decoder's 4-latent-pixel tiles and the encoder's 16-pixel tiles divided between 2 ranks: statistics at
    every GroupNorm barrier and the crops at the end gathered exactly."""
    script = tmp_path / "vae.py"
    script.write_text(VAE_SCRIPT)
    p = launch(sys.executable, script, tmp_path / "out")
    _, err = p.communicate(timeout=600)
    assert (tmp_path / "out_1.npy").is_file(), err
    single = tmp_path / "single.py"
    single.write_text(VAE_SCRIPT.replace("group = world()", "group = None").replace("{group.rank()}", "single"))
    subprocess.run([sys.executable, single, tmp_path / "out"], check=True)
    expected = np.load(tmp_path / "out_single.npy")
    for rank in (0, 1):
        assert np.array_equal(np.load(tmp_path / f"out_{rank}.npy"), expected), rank

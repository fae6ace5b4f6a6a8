"""Outputs get the mode any editor would give them (0666 less the umask); an overwritten file keeps its mode."""

import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.cli.caption import write_atomic
from supir_mlx.io.images import save_image


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_restored_images_and_comparisons_get_the_umask_mode(weights, tmp_path, umask):
    src = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), np.uint8)).save(src)
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(main, ["restore", str(src), "-o", str(out), "--weights", str(weights), "--prompt", "x",
                                  "--steps", "1", "--min-size", "64", "--compare", "-q"])
    assert r.exit_code == 0, r.output
    for name in ("p_supir.png", "p_supir_compare.png"):
        assert mode(out / name) == 0o666 & ~umask, name


@pytest.mark.parametrize("fmt", ["png", "jpg", "tif", "webp"])
def test_save_image_new_and_overwritten(tmp_path, umask, fmt):
    px = np.zeros((8, 8, 3), np.uint8)
    new = tmp_path / f"new.{fmt}"
    save_image(new, px)
    assert mode(new) == 0o666 & ~umask
    kept = tmp_path / f"kept.{fmt}"
    save_image(kept, px)
    os.chmod(kept, 0o640)
    save_image(kept, px + 1, overwrite=True)
    assert mode(kept) == 0o640


def test_caption_sidecar_mode(tmp_path, umask):
    side = tmp_path / "p.txt"
    write_atomic(side, "a caption\n")
    assert mode(side) == 0o666 & ~umask and side.read_text() == "a caption\n"
    os.chmod(side, 0o604)
    write_atomic(side, "another\n")
    assert mode(side) == 0o604 and side.read_text() == "another\n"

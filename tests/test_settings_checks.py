"""Every numeric setting is finite and inside its documented range, refused in one line before any work; a NaN or
Inf that appears while restoring stops that image with a clear error."""

import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.io.images import save_image
from supir_mlx.io.metadata import make_provenance
from supir_mlx.pipeline import supir as supir_module
from supir_mlx.pipeline.restore import Restorer
from supir_mlx.pipeline.settings import RANGES, RestoreSettings, SettingsError, settings_for
from supir_mlx.pipeline.supir import NonFiniteError

FAST = ["--steps", "2", "--min-size", "64", "--prompt", "x", "-q"]


@pytest.fixture(scope="module")
def restorer(weights):
    return Restorer.from_weights(weights)


def photo(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--cfg", "nan"], "cfg must be a finite number in [0, 50], got nan"),
    (["--s-noise", "inf"], "s noise must be a finite number in [0.5, 2], got inf"),
    (["--control-scale", "-1e30"], "control scale must be in [0, 5], got -1e+30"),
    (["--cfg-start", "-inf"], "cfg start must be a finite number in [0, 50], got -inf"),
    (["--upscale", "1e9"], "upscale must be in [0.01, 16], got 1e+09"),
    (["--restore-cfg", "nan"], "restore cfg must be a finite number in [-1, 20], got nan"),
    (["--eta", "-1"], "eta must be in [0, 10], got -1"),
    (["--seed", "-5"], "seed must be in [0, 9.22337e+18], got -5"),
    (["--tile-size", "4"], "tile size must be in [8, 1024], got 4"),
    (["--memory-limit", "nan"], "memory limit (GB) must be a finite number in [0.1, 100000], got nan"),
])
def test_cli_refuses_before_any_work(weights, tmp_path, monkeypatch, args, message):
    img = photo(tmp_path / "p.png")
    monkeypatch.setattr(Restorer, "from_weights", lambda *a, **k: pytest.fail("loaded weights for a bad setting"))
    r = CliRunner().invoke(main, ["restore", str(img), "--weights", str(weights), *FAST, *args])
    assert r.exit_code == 1 and r.output.strip() == f"error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


@pytest.mark.parametrize("knob", sorted(RANGES))
def test_every_numeric_knob_is_checked(knob):
    lo, hi, kind = RANGES[knob]
    for bad in (math.nan, math.inf, -math.inf, lo - 1, hi + 1, "3", True) + ((lo + 0.5,) if kind == "int" else ()):
        with pytest.raises(SettingsError, match=knob.replace("_", " ")):
            RestoreSettings(**{knob: bad}).validate()
    RestoreSettings(**{knob: type(lo)(lo) if kind == "int" else float(lo)}).validate()  # the ends are allowed
    RestoreSettings(**{knob: int(hi) if kind == "int" else float(hi)}).validate()


def test_api_refuses_nan(restorer):
    with pytest.raises(SettingsError, match="cfg must be a finite number"):
        restorer.restore(np.zeros((20, 20, 3), np.uint8), cfg=float("nan"), steps=1, min_size=64, prompt="x")
    with pytest.raises(SettingsError, match="steps must be a whole number"):
        settings_for(steps=2.5)


def test_settings_from_a_record_with_nan(weights, tmp_path):
    rec = tmp_path / "earlier.png"
    prov = make_provenance({**settings_for().to_dict(), "cfg": float("nan")}, model="m", base_checkpoint="b",
                           caption="", seed=1)
    save_image(rec, np.zeros((8, 8, 3), np.uint8), provenance=prov)
    img = photo(tmp_path / "p.png")
    r = CliRunner().invoke(main, ["restore", str(img), "--weights", str(weights), "--settings-from", str(rec)])
    assert r.exit_code == 1 and r.output.strip() == "error: cfg must be a finite number in [0, 50], got nan"


@pytest.fixture
def poison(monkeypatch):
    """The denoiser returns NaN while `state["on"]` (as a diverging sampler would)."""
    state = {"on": False}
    real = supir_module.guided_denoiser

    def guided(*a, **k):
        f = real(*a, **k)
        def poisoned(*x, **kw):
            k = math.nan if state["on"] else 1.0
            return tuple(o * k for o in f(*x, **kw))  # (unconditional, conditional) denoised

        return poisoned

    monkeypatch.setattr(supir_module, "guided_denoiser", guided)
    return state


def test_nan_during_sampling_stops_the_image(restorer, poison):
    poison["on"] = True
    with pytest.raises(NonFiniteError, match=r"^NaN or Inf values appeared at sampler step 1 of 2; this image was "
                                             r"stopped, nothing written \(try a lower --cfg"):
        restorer.restore(np.zeros((20, 20, 3), np.uint8), steps=2, min_size=64, prompt="x")


def test_inf_while_decoding_stops_the_image(restorer, monkeypatch):
    real, calls = supir_module.SupirRunner.decode, []

    def decode(self, z, tiles, *rest):
        calls.append(1)
        out = real(self, z, tiles, *rest)
        return out * math.inf if len(calls) == 2 else out  # the stage-1 decode passes, the final one overflows

    monkeypatch.setattr(supir_module.SupirRunner, "decode", decode)
    with pytest.raises(NonFiniteError, match="while decoding the sampled latent.*--vae-dtype float32"):
        restorer.restore(np.zeros((20, 20, 3), np.uint8), steps=1, min_size=64, prompt="x")


def test_batch_goes_on_after_a_nan_image(weights, tmp_path, poison, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    photo(src / "a.png", 1)
    photo(src / "b.png", 2)
    real, calls = Restorer.restore, []

    def restore(self, *a, **k):
        calls.append(1)
        poison["on"] = len(calls) == 1  # the first image diverges
        return real(self, *a, **k)

    monkeypatch.setattr(Restorer, "restore", restore)
    r = CliRunner().invoke(main, ["restore", str(src), "-o", str(tmp_path / "out"), "--weights", str(weights), *FAST])
    assert r.exit_code == 1
    assert f"  FAILED {src / 'a.png'}: NaN or Inf values appeared at sampler step 1 of 2" in r.output
    assert "1 done, 0 skipped, 1 failed" in r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b_supir.png"]
    assert mx.all(mx.isfinite(mx.array(np.asarray(Image.open(tmp_path / "out" / "b_supir.png"), np.float32)))).item()

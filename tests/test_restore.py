"""End to end: convert the tiny reference checkpoint, then restore real image files through the CLI and the API."""

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.io.metadata import read_provenance

FAST = ["--steps", "2", "--min-size", "64"]


@pytest.fixture(scope="module")
def restorer(weights):
    from supir_mlx import Restorer

    return Restorer.from_weights(weights)


def photo(path, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([xx * 6 % 256, yy * 8 % 256, (xx + yy) * 3 % 256], -1).astype(np.uint8)
    rgb = np.clip(rgb.astype(int) + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    if mode == "RGBA":
        im.putalpha(Image.fromarray((xx * 255 // size[0]).astype(np.uint8)))
    im.save(path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_restore_end_to_end(weights, tmp_path):
    src = photo(tmp_path / "scan.png", mode="RGBA")
    before = digest(src)
    (tmp_path / "scan.txt").write_text("a colourful test chart")
    out_dir = tmp_path / "out"
    args = ["restore", str(src), "-o", str(out_dir), "--weights", str(weights), "--upscale", "2", "--compare", *FAST]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = out_dir / "scan_supir.png"
    im = Image.open(out)
    assert im.size == (80, 60) and im.mode == "RGBA"  # input size x upscale, alpha carried through
    assert (out_dir / "scan_supir_compare.png").is_file()
    assert digest(src) == before  # the input is never touched
    prov = read_provenance(out)
    assert "generative reconstruction" in prov["notice"].lower()
    assert prov["caption"] == "a colourful test chart"  # the sidecar caption was used
    assert prov["settings"]["steps"] == 2 and prov["settings"]["upscale"] == 2.0
    assert "peak" in r.output and "stage1" in r.output

    # A second run resumes: the existing output is skipped, not redone.
    mtime = out.stat().st_mtime_ns
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "skip" in r.output and out.stat().st_mtime_ns == mtime

    # --settings-from repeats the run exactly (same seed, same settings, same caption).
    again = tmp_path / "again.png"
    r = CliRunner().invoke(main, ["restore", str(src), "-o", str(again), "--weights", str(weights),
                                  "--settings-from", str(out)])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(im))


def test_cli_batch_survives_a_bad_file(weights, tmp_path):
    photo(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    r = CliRunner().invoke(main, ["restore", str(tmp_path), "--weights", str(weights), "--prompt", "", *FAST])
    assert r.exit_code == 1
    assert (tmp_path / "good_supir.png").is_file()
    assert not (tmp_path / "broken_supir.jpg").exists()
    assert "broken.jpg" in r.output and "1 done" in r.output and "1 failed" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args, message", [
    (["restore", "/nonexistent/photo.jpg"], "no such file"),
    (["restore", "{img}", "--steps", "0"], "steps must be"),
    (["restore", "{img}", "--prompt", "x", "--no-caption"], "contradict"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message, weights):
    img = photo(tmp_path / "p.png")
    args = [a.replace("{img}", str(img)) for a in args] + ["--weights", str(weights)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_plan_prints_without_running(tmp_path, weights):
    img = photo(tmp_path / "p.png", size=(512, 384))
    r = CliRunner().invoke(main, ["restore", str(img), "--weights", str(weights), "--upscale", "2", "--plan",
                                  "--memory-limit", "64"])
    assert r.exit_code == 0, r.output
    assert "expected peak" in r.output and "1024x768" in r.output
    assert not (tmp_path / "p_supir.png").exists()


def test_api_is_reusable_and_deterministic(restorer, tmp_path):
    img = Image.open(photo(tmp_path / "p.png"))
    a = restorer.restore(img, prompt="a test chart", steps=2, min_size=64, seed=7)
    b = restorer.restore(np.asarray(img), prompt="a test chart", steps=2, min_size=64, seed=7)
    c = restorer.restore(img, prompt="a test chart", steps=2, min_size=64, seed=8)
    assert a.image.size == img.size and a.stage1.size == img.size
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.settings.seed == 7 and a.caption == "a test chart"
    assert set(a.stages) == {"stage1", "condition", "sample", "decode"} and a.peak_memory > 0
    assert np.allclose(a.pixels[0] * 255, np.asarray(a.image), atol=1.0)


def test_each_stage_runs_under_its_planned_cache_limit(restorer, tmp_path, monkeypatch):
    import mlx.core as mx

    set_limit, limits, seen = mx.set_cache_limit, [], {}
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: limits.append(n) or set_limit(n))

    def progress(event):
        if event.kind == "stage":
            seen.setdefault(event["stage"], limits[-1])

    r = restorer.restore(Image.open(photo(tmp_path / "p.png")), prompt="", steps=2, min_size=64, on_event=progress)
    planned = r.plan.cache_limits
    assert seen == {stage: planned[stage] for stage in ("stage1", "condition", "sample", "decode")}
    assert limits[0] == planned.get("caption", r.plan.cache_limit)


def test_api_presets_and_samples(restorer, tmp_path):
    img = Image.open(photo(tmp_path / "p.png"))
    r = restorer.restore(img, preset="lightning", prompt="", steps=3, min_size=64)
    assert r.settings.sampler == "dpmpp" and r.settings.cfg == 2.0
    two = restorer.restore(img, prompt="", steps=2, min_size=64, num_samples=2)
    assert len(two.images) == 2
    assert not np.array_equal(np.asarray(two.images[0]), np.asarray(two.images[1]))


def test_tiled_sampling_through_the_pipeline(restorer, tmp_path):
    """A 256x128 working image has a 32x16 latent: 8-pixel tiles at stride 4 make it 7x3 tiles wide."""
    img = Image.open(photo(tmp_path / "p.png", size=(256, 128)))
    common = dict(prompt="", steps=2, min_size=128, s_churn=0, color_fix="none")
    whole = restorer.restore(img, **common)
    one_tile = restorer.restore(img, tile_size=32, tile_stride=32, **common)
    tiled = restorer.restore(img, tile_size=8, tile_stride=4, **common)
    # one tile covering the whole latent is exactly the untiled run; real tiles condition on their own crops
    assert np.abs(one_tile.pixels[0] - whole.pixels[0]).max() < 1e-5
    diff = np.abs(tiled.pixels[0] - whole.pixels[0])
    assert diff.max() > 1e-4


def test_settings_round_trip_through_json():
    from supir_mlx import RestoreSettings, settings_for

    s = settings_for("quality", seed=3, upscale=2)
    assert RestoreSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.cfg == 7.5 and s.cfg_start == 4.0 and s.s_noise == 1.003


def test_draft_box_is_one_tile_of_the_working_image():
    from supir_mlx import settings_for
    from supir_mlx.pipeline.restore import draft_box

    s = settings_for(upscale=2)
    assert draft_box(2000, 1500, s) == (744, 494, 1256, 1006)  # 512 input px = 1024 working px, centred
    # a small photo is enlarged to a 1024 short side (x5.12): the crop is its centred 200x200 square
    assert draft_box(300, 200, s) == (50, 0, 250, 200)


def test_cli_draft_writes_a_separate_preview(weights, tmp_path):
    src = photo(tmp_path / "p.png")
    r = CliRunner().invoke(main, ["restore", str(src), "--weights", str(weights), "--draft", "--prompt", "", *FAST])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p_supir_draft.png").is_file() and not (tmp_path / "p_supir.png").exists()


def test_staged_residency_releases_parts_and_changes_nothing(restorer, tmp_path):
    """A staged plan keeps only each stage's weights: same numbers, and the other parts are really gone."""
    import mlx.core as mx

    from supir_mlx import settings_for
    from supir_mlx.pipeline.preprocess import pil_to_tensor
    from supir_mlx.sampling.noise import SeededNoise

    x, _, _ = pil_to_tensor(Image.open(photo(tmp_path / "p.png")), 1, 64)
    s = settings_for(steps=2, min_size=64, prompt="")
    runner = restorer.runner
    seen = {}

    def progress(event):
        if event.kind == "stage":
            seen.setdefault(event["stage"], (set(runner.residency.resident), mx.get_active_memory()))

    resident = np.array(runner.sample(mx.array(x), [""], s, SeededNoise(1), staged=False))
    assert runner.residency.resident == {"vae", "text", "denoiser"}
    staged = np.array(runner.sample(mx.array(x), [""], s, SeededNoise(1), staged=True, on_event=progress))
    assert np.array_equal(staged, resident)
    assert seen["stage1"][0] == {"vae"} and seen["sample"][0] == {"vae", "denoiser"} and seen["decode"][0] == {"vae"}
    assert runner.residency.resident == {"vae"}
    # stage 1 ran with neither the text encoders nor the UNet/control in memory
    assert seen["stage1"][1] < seen["sample"][1]
    runner.use(False)  # back to everything resident for the other tests
    assert runner.residency.resident == {"vae", "text", "denoiser"}


def test_cli_offline_without_weights_lists_what_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("SUPIR_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    src = photo(tmp_path / "p.png")
    r = CliRunner().invoke(main, ["restore", str(src), "--offline", "--prompt", "a chart", "--memory-limit", "64"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "sd_xl_base_1.0_0.9vae.safetensors" in r.output and "SUPIR-v0Q_fp16.safetensors" in r.output
    assert "supir-mlx download" in r.output and not (tmp_path / "p_supir.png").exists()


def test_loading_reads_no_weight_until_a_stage_needs_it(weights):
    """Loading checks the folder but reads nothing: a staged plan then holds only each stage's part, from the
    very first stage on (a plan made for weights per stage must not meet them all at load time)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from supir_mlx import Restorer

    before = mx.get_active_memory()
    r = Restorer.from_weights(weights)
    sizes = {k: v.nbytes for k, v in tree_flatten(r.model.parameters())}
    total = sum(sizes.values())
    vae = sum(n for k, n in sizes.items() if k.startswith("first_stage_model."))
    assert r.runner.residency.resident == set()
    assert mx.get_active_memory() - before < 0.02 * total
    r.runner.use(True, "vae")
    assert 0.98 * vae <= mx.get_active_memory() - before < vae + 0.02 * total
    r.runner.use(False)
    assert mx.get_active_memory() - before >= 0.98 * total

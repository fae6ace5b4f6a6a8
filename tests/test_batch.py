"""Batch collection, output planning, the resumable runner, the compare image and `supir-mlx info`."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.io.batch import collect_inputs, plan_outputs, run_batch
from supir_mlx.io.compare import compare_path, write_compare
from supir_mlx.io.images import ImageError, load_image, save_image
from supir_mlx.io.metadata import make_provenance

PX = np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8)


def _tree(tmp_path):
    (tmp_path / "scans" / "sub").mkdir(parents=True)
    for rel in ["scans/a.jpg", "scans/b.PNG", "scans/sub/c.tif"]:
        Image.fromarray(PX).save(tmp_path / rel)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    return tmp_path / "scans"


def test_collect_inputs(tmp_path):
    scans = _tree(tmp_path)
    assert [p.name for p in collect_inputs([scans])] == ["a.jpg", "b.PNG"]
    assert [p.name for p in collect_inputs([scans], recursive=True)] == ["a.jpg", "b.PNG", "c.tif"]
    both = collect_inputs([scans / "a.jpg", scans, str(scans / "*.jpg")])
    assert [p.name for p in both] == ["a.jpg", "b.PNG"]  # deduplicated, first occurrence kept
    for bad, reason in [(tmp_path / "nope", "no such file"), (scans / "notes.txt", "unsupported file type"),
                        (str(tmp_path / "*.gif"), "no files match")]:
        with pytest.raises(ImageError, match=reason):
            collect_inputs([bad])


def test_plan_outputs_patterns_and_refusals(tmp_path):
    scans = _tree(tmp_path)
    inputs = collect_inputs([scans], recursive=True)
    items = plan_outputs(inputs, tmp_path / "out")
    assert [i.output.name for i in items] == ["a_supir.jpg", "b_supir.PNG", "c_supir.tif"]
    items = plan_outputs(inputs, tmp_path / "out", "{index:03d}_{parent}_{stem}", ext=".png")
    assert [i.output.name for i in items] == ["001_scans_a.png", "002_scans_b.png", "003_sub_c.png"]
    with pytest.raises(ImageError, match="would overwrite an input"):
        plan_outputs(inputs, None, "{stem}{ext}")
    with pytest.raises(ImageError, match="also the output of another input"):
        plan_outputs(inputs, tmp_path / "out", "same.png")
    with pytest.raises(ImageError, match="unknown placeholder"):
        plan_outputs(inputs, tmp_path / "out", "{name}.png")


def test_run_batch_failures_interrupt_and_resume(tmp_path):
    scans = _tree(tmp_path)
    (scans / "broken.jpg").write_bytes(b"garbage")
    items = plan_outputs(collect_inputs([scans], recursive=True), tmp_path / "out", ext=".png")
    calls = []

    def process(item):
        calls.append(item.input.name)
        img = load_image(item.input)
        if item.input.name == "c.tif" and len(calls) < 5:
            raise KeyboardInterrupt  # Ctrl-C while the third photo is being processed
        save_image(item.output, img.rgb)

    first = run_batch(items, process)
    assert first.interrupted and not first.ok
    assert [i.input.name for i in first.done] == ["a.jpg", "b.PNG"]
    assert [(i.input.name, r.split(": ", 1)[1]) for i, r in first.failed] == [
        ("broken.jpg", "not a supported image file (JPEG, PNG, TIFF, WebP)")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_supir.png", "b_supir.png"]

    calls.clear()
    calls.extend(["x"] * 5)  # the second run is not interrupted
    second = run_batch(items, process)
    assert [i.input.name for i, _ in second.skipped] == ["a.jpg", "b.PNG"]
    assert [i.input.name for i in second.done] == ["c.tif"] and len(second.failed) == 1
    assert second.line() == "1 done, 2 skipped, 1 failed"


def test_compare_image(tmp_path):
    out = save_image(tmp_path / "r.png", np.repeat(np.repeat(PX, 2, 0), 2, 1))
    path = write_compare(out, PX, load_image(out).rgb, labels=None)
    assert path == compare_path(out) == tmp_path / "r_compare.png"
    cmp = load_image(path).rgb
    assert cmp.shape == (32, 2 * 40 + 4, 3)
    assert (cmp[:, 40:44] == 255).all() and (cmp[:, 44:] == load_image(out).rgb).all()
    labelled = write_compare(tmp_path / "s.png", PX, load_image(out).rgb)
    assert load_image(labelled).rgb.shape == (32, 84, 3)


def test_info_command(tmp_path):
    prov = make_provenance({"steps": 8}, model="v0Q", base_checkpoint="lightning", caption="a fox", seed=7)
    out = save_image(tmp_path / "o.jpg", PX, provenance=prov)
    plain = tmp_path / "plain.png"
    Image.fromarray(PX).save(plain)
    runner = CliRunner()
    res = runner.invoke(main, ["info", str(out)])
    assert res.exit_code == 0 and "generative reconstruction" in res.output.lower() and "settings.steps" in res.output
    res = runner.invoke(main, ["info", "--json", str(out)])
    assert json.loads(res.output)["seed"] == 7
    res = runner.invoke(main, ["info", str(plain), str(tmp_path / "missing.png")])
    assert res.exit_code == 1 and "no supir-mlx record" in res.output and "file not found" in res.output
    assert "Traceback" not in res.output

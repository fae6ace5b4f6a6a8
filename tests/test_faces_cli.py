"""Face mode end to end on the tiny model: `restore --faces` through the CLI (given landmarks, no face, a face cut
by the border, a face too small for the eye-distance rule), the API's events and record, the plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from supir_mlx.cli import main
from supir_mlx.models.parsenet import ParseNetConfig
from supir_mlx.models.retinaface import RetinaFaceConfig
from supir_mlx.pipeline import faces
from supir_mlx.weights.faces import convert_faces, load_faces

# small faces so the tiny model restores each in a moment (the official sizes are 1024)
FACE = ["--face-size", "128", "--face-resolution", "96"]
FAST = ["--steps", "1", "--min-size", "64"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def no_traceback(r) -> bool:
    return "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))


@pytest.fixture(scope="module")
def face_weights(tmp_path_factory, reference_dir):
    """The reduced reference detector and parser, converted like the real ones (architectures from their metadata)."""
    from supir_mlx.conformance import Fixture

    root = reference_dir / "face"
    det, par = (Fixture(reference_dir, root / f"{n}_tiny_weights.safetensors") for n in ("retinaface", "parsenet"))
    return convert_faces(det.tensors, par.tensors, tmp_path_factory.mktemp("fw") / "faces",
                         RetinaFaceConfig.from_dict(det.meta), ParseNetConfig.from_dict(par.meta))


def test_converted_face_folder_loads_strictly(face_weights, tmp_path):
    det, par = load_faces(face_weights)
    assert det.cfg.layers == (1, 1, 1, 1) and par.cfg.base_ch == 16
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((face_weights / "config.json").read_text())
    for f in ("retinaface.safetensors", "parsenet.safetensors"):
        (broken / f).write_bytes((face_weights / f).read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    cfg["parsenet"]["res_depth"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="parsenet.safetensors"):
        load_faces(broken)


def group_photo(path: Path, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    px = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    Image.fromarray(px).save(path)
    return px


# eyes, nose, mouth corners in input pixels
INSIDE = [[180, 200], [230, 200], [205, 230], [185, 255], [225, 255]]
CUT = [[480, 100], [525, 100], [503, 128], [485, 150], [520, 150]]  # right half outside the 512-px image
SMALL = [[100, 400], [103, 400], [101, 402], [100, 404], [103, 404]]  # official "eye distance" 2 px: dropped (< 5)


def test_group_photo_faces_pasted_where_they_were(weights, face_weights, tmp_path):
    """Background kept: every pixel away from the two kept faces is the input's; each face's region changed,
    the cut face only inside the image; the tiny face was dropped; provenance lists faces and captions."""
    src = tmp_path / "group.png"
    px = group_photo(src)
    lm = tmp_path / "lm.json"
    lm.write_text(json.dumps({"group.png": [INSIDE, CUT, SMALL]}))
    out = tmp_path / "out.png"
    r = run("restore", src, "-o", out, "--weights", weights, "--face-weights", face_weights, "--faces", *FACE,
            "--keep-background", "--face-prompt", "a smiling face", "--face-landmarks", lm, "--prompt", "", *FAST)
    assert r.exit_code == 0, r.output
    im = Image.open(out)
    res = np.asarray(im)
    assert res.shape == px.shape
    changed = np.abs(res.astype(int) - px).max(-1) > 0
    # where each face can reach: its similarity warp of the face_size square (cv2's own inverse)
    reach = np.zeros((512, 512), bool)
    for pts in (INSIDE, CUT):
        face = faces.Face(landmarks=np.array(pts, float))
        faces.align(px, face, 128)
        mask = faces.cv2().warpAffine(np.ones((128, 128), np.float32), faces.inverse_affine(face.affine), (512, 512))
        reach |= mask > 0
        assert changed[mask > 0.999].mean() > 0.5  # the face itself was replaced
    assert not changed[~reach].any()
    rec = json.loads(im.text["supir-mlx"])["faces"]
    assert rec["found"] == 2 and rec["dropped_small"] == 1 and rec["landmarks"] == "given" and rec["background"] == "kept"
    assert [f["caption"] for f in rec["faces"]] == ["a smiling face"] * 2
    assert np.allclose(rec["faces"][1]["landmarks"], CUT)


def test_photo_without_faces_restores_as_without_the_option(weights, face_weights, tmp_path):
    """The tiny detector finds nothing (its scores stay below the official 0.8): the plain restore, and a note."""
    src = tmp_path / "plain.png"
    Image.fromarray((np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)).save(src)
    common = ["--weights", weights, "--prompt", "", "--seed", "7", *FAST]
    r1 = run("restore", src, "-o", tmp_path / "faces.png", "--faces", "--face-weights", face_weights, *common)
    r2 = run("restore", src, "-o", tmp_path / "plain_out.png", *common)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert "no face found in plain.png: restored without face mode" in r1.output
    a, b = Image.open(tmp_path / "faces.png"), Image.open(tmp_path / "plain_out.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert json.loads(a.text["supir-mlx"])["faces"]["found"] == 0


def test_api_events_name_each_face_and_the_background_is_restored(weights, face_weights):
    from supir_mlx import Restorer
    from supir_mlx.pipeline.faces import FaceModels

    restorer = Restorer.from_weights(weights)
    restorer.face_models = FaceModels(*load_faces(face_weights))
    img = Image.fromarray((np.random.default_rng(2).random((64, 80, 3)) * 255).astype(np.uint8))
    stages = []
    result = restorer.restore(img, faces=True, face_size=128, face_resolution=128, steps=1, min_size=64, upscale=2,
                              prompt="", face_landmarks=[[[20, 24], [40, 24], [30, 34], [22, 44], [38, 44]]],
                              on_event=lambda e: stages.append(e["stage"]) if e.kind == "stage" else None)
    assert result.image.size == (160, 128) and result.stage1.size == (160, 128)
    assert "face 1 of 1 sample" in stages and "sample" in stages
    assert stages.index("face 1 of 1 sample") < stages.index("sample")  # faces first, then the background
    assert result.faces["found"] == 1 and result.faces["background"] == "restored"
    # landmarks recorded in input pixels, though the face was aligned in the enlarged working image
    assert np.allclose(result.faces["faces"][0]["landmarks"][0], [20, 24], atol=0.01)


def test_detector_glue_applies_the_eye_distance_rule(face_weights, reference_dir):
    """find_faces on the reduced detector with the reference case's own threshold and no enlargement gives the
    reference detections; their eyes are < 1 px apart, so the official 5 px rule drops every one of them."""
    det, _ = load_faces(face_weights)
    case = load_file(str(reference_dir / "face" / "retinaface_tiny_detect.safetensors"))
    img, ref = case["image_hwc_uint8"], case["dets"]
    kw = dict(resize=min(img.shape[:2]), conf_threshold=0.5166806578636169)
    found, dropped = faces.find_faces(det, img, eye_dist_threshold=0, **kw)
    assert dropped == 0 and len(found) == len(ref)
    ours = np.array([np.concatenate([f.box, f.landmarks.ravel()]) for f in found])
    for row in ref:
        assert np.abs(ours - row).max(axis=1).min() < 1e-3
    found, dropped = faces.find_faces(det, img, **kw)
    assert found == [] and dropped == len(ref)


def test_plan_lists_the_face_passes(tmp_path):
    src = tmp_path / "big.png"
    Image.new("RGB", (1536, 1024)).save(src)
    r = run("restore", src, "--faces", "--plan", "--memory-limit", "16", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    assert "detection on the 1536x1024 working image +0.96 GB" in r.output
    assert "then one 1024x1024 restore per face found" in r.output and "a photo with n faces runs n + 1 restores" in r.output


def test_bad_face_options_are_one_line_errors(weights, tmp_path):
    src = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(src)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[[1, 2], [3, 4]]]))
    cases = [
        (["--face-landmarks", bad], "landmarks must be a list of faces, each 5 [x, y] points"),
        (["--num-samples", "2"], "face mode restores one sample"),
        (["--face-weights", tmp_path], "not a face-weights folder"),
        (["--face-resolution", "100"], "face resolution must be a multiple of 32"),
    ]
    for extra, message in cases:
        r = run("restore", src, "--weights", weights, "--faces", "--prompt", "", *extra, *FAST)
        assert r.exit_code == 1 and message in r.output and no_traceback(r), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_each_face_gets_its_own_llava_caption(weights, face_weights, reference_dir, tmp_path, monkeypatch):
    """With a captioner: the photo is captioned as usual and every face gets LLaVA's caption of its own crop, cut
    at face size from the stage-1 image (the demo's llave_process); both land in the record."""
    import shutil

    from test_llava_caption import _write_tokenizer

    from supir_mlx import Restorer
    from supir_mlx.captioner import Captioner
    from supir_mlx.pipeline.faces import FaceModels
    from supir_mlx.weights.llava_convert import convert_llava

    src = tmp_path / "llava-hf"
    src.mkdir()
    shutil.copyfile(reference_dir / "llava" / "llava_tiny.safetensors", src / "model-00001-of-00001.safetensors")
    shutil.copyfile(reference_dir / "llava" / "llava_tiny_config.json", src / "config.json")
    _write_tokenizer(src)
    seen = []
    caption = Captioner.caption

    def short_caption(self, image, **kw):  # the random tiny LM never ends: cap it, and note what it was shown
        text = caption(self, image, **{**kw, "max_new_tokens": 4})
        seen.append((image.size, text))
        return text

    monkeypatch.setattr(Captioner, "caption", short_caption)
    restorer = Restorer.from_weights(weights, captioner=convert_llava(src, tmp_path / "llava-4bit", bits=4))
    restorer.face_models = FaceModels(*load_faces(face_weights))
    img = Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8))
    result = restorer.restore(img, faces=True, face_size=128, face_resolution=128, steps=1, min_size=64, caption_size=64,
                              face_background=False,
                              face_landmarks=[[[20, 24], [40, 24], [30, 34], [22, 44], [38, 44]]])
    assert [size for size, _ in seen] == [(64, 64), (128, 128)]  # the photo (caption size), then the face crop
    assert result.caption == seen[0][1] and result.faces["faces"][0]["caption"] == seen[1][1]


def test_eye_distance_is_the_helpers_own_formula():
    """facexlib's helper indexes one past the eyes: hypot(eye y difference, right eye x - nose x). A face seen
    from the side with eyes 20 px apart but the nose under the right eye is dropped, as officially."""
    side = np.array([[100, 50], [120, 50], [119, 60], [105, 70], [118, 70]], float)
    assert faces.eye_distance(side) == pytest.approx(1.0)
    kept, dropped = faces.given_faces([side, side + [0, 100]], (1.0, 1.0))
    assert kept == [] and dropped == 2
    frontal = np.array([[100, 50], [120, 50], [110, 60], [102, 70], [118, 70]], float)
    assert faces.eye_distance(frontal) == pytest.approx(10.0) and len(faces.given_faces([frontal], (1.0, 1.0))[0]) == 1

"""`face/`: the face-mode networks on their reduced reference models, the detector's post-processing, the
FaceRestoreHelper geometry and the per-face glue of gradio_demo_face.py.

Every architecture and parameter comes from the fixtures' own metadata: the weight fixtures carry the reduced
models' constructor arguments, the others their thresholds, sizes and counts.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import CaseNotImplemented, Comparison, Context, Fixture, compare, compare_exact
from ...models.parsenet import ParseNetConfig
from ...models.retinaface import RetinaFaceConfig, detect_faces, priors
from ...pipeline import faces
from ...weights.faces import load_parsenet, load_retinaface
from ...weights.loading import is_ignored, mlx_shape

# The README's face tolerance: affines (float64 OpenCV results) agree to 1e-9, tighter than the group rtol.
AFFINE_ATOL = 1e-9
DETECTOR, PARSER = "retinaface_tiny_weights", "parsenet_tiny_weights"


def _sibling(fixture: Fixture, stem: str) -> Fixture:
    return Fixture(fixture.root, fixture.path.parent / f"{stem}.safetensors")


def detector(fixture: Fixture, ctx: Context, **extra):
    """The reduced RetinaFace: architecture from the weight fixture's metadata, anchors from `extra`."""
    weights = _sibling(fixture, DETECTOR) if fixture.path.stem != DETECTOR else fixture
    cfg = RetinaFaceConfig.from_dict({**weights.meta, **extra})
    return ctx.cached(f"retinaface:{cfg}", lambda: load_retinaface(dict(weights.tensors), cfg))


def parser(fixture: Fixture, ctx: Context):
    weights = _sibling(fixture, PARSER) if fixture.path.stem != PARSER else fixture
    cfg = ParseNetConfig.from_dict(weights.meta)
    return ctx.cached(f"parsenet:{cfg}", lambda: load_parsenet(dict(weights.tensors), cfg))


def _weights_round_trip(model, fixture: Fixture, rtol: float) -> list[Comparison]:
    """Every official tensor landed, value for value, in the parameter of the same name (strict loading did the
    rest: no key missing, unexpected or mis-shaped)."""
    params = dict(tree_flatten(model.parameters()))
    out = []
    for key, ref in fixture.tensors.items():
        if is_ignored(key):
            continue
        ours = np.array(params[key])
        if ours.ndim == 4:
            ours = ours.transpose(0, 3, 1, 2)
        assert mlx_shape(ref.shape, params[key].shape) == tuple(params[key].shape)
        out.append(compare(key, ours, ref.astype(np.float32), rtol))
    return out


def _nchw(a: mx.array) -> np.ndarray:
    return np.array(a).transpose(0, 3, 1, 2)


def _dets(ours: np.ndarray, ref: np.ndarray, rtol: float) -> list[Comparison]:
    """Same detections (count, then every row) after the score threshold and NMS. Rows are matched as a set: the
    reduced model's scores tie to a few float32 ulps, so their order is not a property of the implementation;
    that ours are sorted by score is checked separately."""
    out = [compare_exact("dets_count", np.array(len(ours)), np.array(len(ref)))]
    if len(ours) != len(ref):
        return out

    # each reference row against its nearest row of ours; a row of ours may serve only one reference row
    nearest = np.abs(ref[:, None, :].astype(np.float64) - ours[None]).max(axis=2).argmin(axis=1)
    out.append(compare_exact("dets_one_to_one", np.array(len(set(nearest.tolist()))), np.array(len(ref))))
    out.append(compare("dets", ours[nearest], ref, rtol))
    out.append(compare_exact("dets_sorted_by_score", np.array(np.all(np.diff(ours[:, 4]) <= 0)), np.array(True)))
    return out


def run(fixture: Fixture, ctx: Context) -> list[Comparison]:
    rtol = ctx.rtol("face")
    name, meta = fixture.path.stem, fixture.meta
    if name == DETECTOR:
        return _weights_round_trip(detector(fixture, ctx), fixture, rtol)
    if name == PARSER:
        return _weights_round_trip(parser(fixture, ctx), fixture, rtol)
    if name.startswith("retinaface_") and name.endswith("_forward"):
        if meta.get("clip"):
            raise CaseNotImplemented("clipped priors (cfg clip=True) are not used by facexlib's detector")
        model = detector(fixture, ctx, min_sizes=meta["min_sizes"], steps=meta["steps"], variance=meta["variance"])
        loc, conf, landms = model(mx.array(fixture["x"].transpose(0, 2, 3, 1)))
        h, w = fixture["x"].shape[2:]
        return [
            compare("loc", np.array(loc), fixture["loc"], rtol),
            compare("conf", np.array(conf), fixture["conf"], rtol),
            compare("landms", np.array(landms), fixture["landms"], rtol),
            compare("priors", priors(model.cfg, h, w), fixture["priors"], rtol),
        ]
    if name.startswith("retinaface_") and name.endswith("_detect"):
        model = detector(fixture, ctx, mean_bgr=meta["mean_bgr"])
        dets = detect_faces(model, fixture["image_hwc_uint8"], meta["conf_threshold"], meta["nms_threshold"])
        return _dets(dets, fixture["dets"], rtol)
    if name.startswith("parsenet_") and name.endswith("_forward"):
        mask, img = parser(fixture, ctx)(mx.array(fixture["x"].transpose(0, 2, 3, 1)))
        return [compare("out_mask", _nchw(mask), fixture["out_mask"], rtol), compare("out_img", _nchw(img), fixture["out_img"], rtol)]
    if name.startswith("geometry"):
        return _geometry(fixture, ctx)
    if name.startswith("glue_"):
        return _glue(fixture, rtol)
    raise CaseNotImplemented(f"unknown face fixture {name}")


def _geometry(fixture: Fixture, ctx: Context) -> list[Comparison]:
    meta = fixture.meta
    size, upscale = int(meta["face_size"]), int(meta["upscale_factor"])
    if upscale != 1 or not meta["use_parse"]:
        raise CaseNotImplemented("the face flow pastes at upscale 1 with the parse mask (the demo's settings)")
    img = faces.read_image(fixture["lq_hwc_uint8"])
    out = [
        compare_exact("input_img_after_read", img, fixture["input_img_after_read"]),
        Comparison("face_template", float(np.abs(faces.face_template(size) - fixture["face_template"]).max()), AFFINE_ATOL),
    ]
    restored, inverses, labels = [], [], []
    for i in range(int(meta["n_faces"])):
        face = faces.Face(landmarks=fixture[f"landmarks_{i}"])
        crop = faces.align(img, face, size)
        inv = faces.inverse_affine(face.affine, upscale)
        lab = faces.parse_labels(parser(fixture, ctx), fixture[f"restored_{i}"])
        out += [
            Comparison(f"affine_{i}", float(np.abs(face.affine - fixture[f"affine_{i}"]).max()), AFFINE_ATOL),
            compare_exact(f"cropped_{i}", crop, fixture[f"cropped_{i}"]),
            Comparison(f"inverse_affine_{i}", float(np.abs(inv - fixture[f"inverse_affine_{i}"]).max()), AFFINE_ATOL),
            compare_exact(f"parse_labels_{i}", lab, fixture[f"parse_labels_{i}"]),
        ]
        restored.append(fixture[f"restored_{i}"])
        inverses.append(inv)
        labels.append(lab)
    pasted = faces.paste_faces(fixture["bg_hwc_uint8"], restored, inverses, labels)
    return out + [compare_exact("pasted_hwc_uint8", pasted, fixture["pasted_hwc_uint8"])]


def _glue(fixture: Fixture, rtol: float) -> list[Comparison]:
    res, size = int(fixture.meta["face_resolution"]), int(fixture.meta["face_size"])
    face_in, resized = faces.face_to_input(fixture["cropped_face_uint8"], res)
    restored = faces.restored_face(fixture["samples_centre"].transpose(0, 2, 3, 1), size)
    return [
        compare("face_resized", resized.transpose(0, 3, 1, 2), fixture["face_resized"], rtol),
        compare_exact("face_in_shape", np.array(face_in.transpose(0, 3, 1, 2).shape), fixture["face_in_shape"]),
        compare_exact("restored_face_uint8", restored, fixture["restored_face_uint8"]),
    ]

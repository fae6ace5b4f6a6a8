"""Face mode: the official FaceRestoreHelper (SUPIR/utils/face_restoration_helper.py) as gradio_demo_face.py uses
it, the per-face glue around the sampler, and the flow that ties them to a Restorer.

Detection runs on a copy whose short side is at least 640 px; faces whose eyes are closer than 5 px are dropped;
each face is aligned onto the FFHQ 5-point template and cropped at `face_size`; after restoration it is warped
back and blended with a soft square mask limited by a ParseNet face mask. The geometry goes through OpenCV
(estimateAffinePartial2D, warpAffine, erode, GaussianBlur, resize) exactly as the official code calls it, so
crops and pasted pixels match it to the last bit; OpenCV comes with the `faces` extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from ..models.parsenet import ParseNet
from ..models.retinaface import RetinaFace, detect_faces
from ..sampling.noise import SeededNoise
from .settings import RestoreSettings
from ..events import EventCallback
from .supir import StageStats, Trace

# facexlib's 5 landmarks (eyes, nose, mouth corners) of an FFHQ-aligned 512 px face
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]]
)
CROP_BORDER_VALUE = (135, 133, 132)  # grey fill outside the image when a face is cut by the border
DETECT_SIZE = 640  # the demo's get_face_landmarks_5(resize=640): short side for detection, never shrunk
READ_MIN_SIDE = 512  # read_image enlarges images whose short side is below this
EYE_DIST_THRESHOLD = 5.0
CONF_THRESHOLD, NMS_THRESHOLD = 0.8, 0.4
PARSE_SIZE = 512  # the official paste-back parses every face at 512 px whatever the face size
# ParseNet labels kept in the face mask (0 = background, 14 = neck, 16-18 = cloth, hair, hat are left out)
MASK_LABELS = np.array([0] + [255] * 13 + [0, 255, 0, 0, 0], dtype=np.float64)
# Memory of the two networks in float32, measured with MLX (CPU backend, Dec 2026): weights, the detector's peak
# activations per input pixel (256 and 512 px inputs: 627 and 609 B/px) and the parser's at its fixed 512 px.
FACE_NETS_BYTES = 109_406_336 + 85_279_576
DETECTOR_BYTES_PER_PIXEL = 610
PARSER_ACTIVATION_BYTES = 1_533_719_040
PARSE_BLUR = ((101, 101), 11)
PARSE_BORDER = 10


def cv2():
    """OpenCV, or one sentence naming the extra that installs it."""
    try:
        import cv2 as cv
    except ImportError:
        raise RuntimeError('face mode needs OpenCV: pip install -e ".[faces]"') from None
    return cv


@dataclass
class Face:
    landmarks: np.ndarray  # [5, 2] (x, y) in the processed image: eyes, nose, mouth corners
    box: np.ndarray | None = None  # detector row (x1, y1, x2, y2, score) when detected
    affine: np.ndarray | None = None  # [2, 3] image -> face crop
    caption: str = ""


@dataclass
class FaceModels:
    detector: RetinaFace
    parser: ParseNet


def face_template(face_size: int) -> np.ndarray:
    return FFHQ_TEMPLATE_512 * (face_size / 512.0)


def read_image(img: np.ndarray) -> np.ndarray:
    """FaceRestoreHelper.read_image for H x W x 3 uint8: short side enlarged to 512 (bilinear) when smaller."""
    if min(img.shape[:2]) < READ_MIN_SIDE:
        f = READ_MIN_SIDE / min(img.shape[:2])
        img = cv2().resize(img, (0, 0), fx=f, fy=f, interpolation=cv2().INTER_LINEAR)
    return img


def find_faces(
    detector: RetinaFace,
    img: np.ndarray,
    resize: int = DETECT_SIZE,
    eye_dist_threshold: float = EYE_DIST_THRESHOLD,
    conf_threshold: float = CONF_THRESHOLD,
    nms_threshold: float = NMS_THRESHOLD,
) -> tuple[list[Face], int]:
    """get_face_landmarks_5(only_center_face=False, resize, eye_dist_threshold): (kept faces, faces dropped by
    the eye-distance rule). Landmarks stay float32 like the detector's rows."""
    cv = cv2()
    h, w = img.shape[:2]
    scale = max(1.0, resize / min(h, w))
    small = cv.resize(img, (int(w * scale), int(h * scale)), interpolation=cv.INTER_LINEAR) if scale != 1 else img
    rows = detect_faces(detector, small, conf_threshold, nms_threshold) / scale
    faces, dropped = [], 0
    for row in rows:
        if eye_distance(row[5:15]) < eye_dist_threshold:
            dropped += 1
            continue
        faces.append(Face(landmarks=row[5:15].reshape(5, 2), box=row[:5]))
    return faces, dropped


def eye_distance(landmarks: np.ndarray) -> float:
    """The helper's "eye distance" exactly as computed: norm([bbox[6] - bbox[8], bbox[7] - bbox[9]]) over the
    detector row, whose landmarks start at index 5, i.e. hypot(left eye y - right eye y, right eye x - nose x)
    (one index past the two eyes' x and y); kept as is so the same faces are dropped as officially."""
    f = np.asarray(landmarks).ravel()
    return float(np.linalg.norm([f[1] - f[3], f[2] - f[4]]))


def align(img: np.ndarray, face: Face, face_size: int) -> np.ndarray | None:
    """align_warp_face for one face: sets face.affine, returns the face_size^2 crop (None if no similarity fits)."""
    cv = cv2()
    face.affine = cv.estimateAffinePartial2D(face.landmarks, face_template(face_size), method=cv.LMEDS)[0]
    if face.affine is None:
        return None
    return cv.warpAffine(
        img, face.affine, (face_size, face_size), borderMode=cv.BORDER_CONSTANT, borderValue=CROP_BORDER_VALUE
    )


def inverse_affine(affine: np.ndarray, upscale: int = 1) -> np.ndarray:
    """get_inverse_affine plus the paste-back's half-pixel offset (only when the output is upscaled)."""
    inv = cv2().invertAffineTransform(affine) * upscale
    if upscale > 1:
        inv[:, 2] += 0.5 * upscale
    return inv


def parse_labels(parser: ParseNet, face: np.ndarray) -> np.ndarray:
    """ParseNet argmax [512, 512] on a restored face: resized to 512, channels swapped (the helper's BGR->RGB),
    /255, normalised with mean 0.5 and std 0.5."""
    cv = cv2()
    x = cv.resize(face, (PARSE_SIZE, PARSE_SIZE), interpolation=cv.INTER_LINEAR).astype(np.float32) / np.float32(255)
    x = (x[:, :, ::-1] - np.float32(0.5)) / np.float32(0.5)
    logits, _ = parser(mx.array(np.ascontiguousarray(x)[None]))
    return np.array(mx.argmax(logits[0], axis=-1)).astype(np.uint8)


def paste_faces(
    bg: np.ndarray, restored: list[np.ndarray], inverses: list[np.ndarray], labels: list[np.ndarray],
    size_of: tuple[int, int] | None = None,
) -> np.ndarray:
    """paste_faces_to_input_image(upsample_img=bg) at upscale 1: each face warped back and blended onto the running
    result with min(soft square mask, blurred parse mask); truncated to uint8 at the end. The result has the size
    of the image the faces were aligned in (`size_of`, default bg's), bg resized to it (LANCZOS4) if it differs."""
    cv = cv2()
    h, w = size_of or bg.shape[:2]
    out = bg if bg.shape[:2] == (h, w) else cv.resize(bg, (w, h), interpolation=cv.INTER_LANCZOS4)
    for face, inv, lab in zip(restored, inverses, labels):
        size = face.shape[1], face.shape[0]
        inv_restored = cv.warpAffine(face, inv, (w, h))
        inv_mask = cv.warpAffine(np.ones(size[::-1], dtype=np.float32), inv, (w, h))
        inv_mask_erosion = cv.erode(inv_mask, np.ones((2, 2), np.uint8))  # the warp's black border
        pasted = inv_mask_erosion[:, :, None] * inv_restored
        w_edge = int(np.sum(inv_mask_erosion) ** 0.5) // 20
        centre = cv.erode(inv_mask_erosion, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
        soft = cv.GaussianBlur(centre, (2 * w_edge + 1, 2 * w_edge + 1), 0)[:, :, None]
        parse = MASK_LABELS[lab]
        parse = cv.GaussianBlur(parse, *PARSE_BLUR)
        parse = cv.GaussianBlur(parse, *PARSE_BLUR)
        b = PARSE_BORDER
        parse[:b, :], parse[-b:, :], parse[:, :b], parse[:, -b:] = 0, 0, 0, 0
        parse = cv.resize(parse / 255.0, size)
        parse = cv.warpAffine(parse, inv, (w, h), flags=cv.INTER_AREA)[:, :, None]
        mask = np.where(parse < soft, parse, soft)
        out = mask * pasted + (1 - mask) * out
    return out.astype(np.uint8)


# ------------------------------------------------------------------------------------- per-face glue
def resize_bilinear_torch(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """`F.interpolate(x, (height, width), mode='bilinear', align_corners=False)` on NHWC float32."""
    x = np.asarray(x, np.float32)

    def axis(n_in: int, n_out: int):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
        i0 = np.floor(src).astype(np.int64)
        lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (np.float32(1) - lam), lam

    y0, y1, wy0, wy1 = axis(x.shape[1], height)
    x0, x1, wx0, wx1 = axis(x.shape[2], width)
    wx0, wx1 = wx0[None, None, :, None], wx1[None, None, :, None]
    top = x[:, y0][:, :, x0] * wx0 + x[:, y0][:, :, x1] * wx1
    bottom = x[:, y1][:, :, x0] * wx0 + x[:, y1][:, :, x1] * wx1
    return top * wy0[None, :, None, None] + bottom * wy1[None, :, None, None]


def face_to_input(crop: np.ndarray, resolution: int, canvas: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A face crop as the sampler's input: [-1, 1], bilinear to `resolution`, zero-padded to `canvas` when smaller.
    Returns (padded input [1, S, S, 3], the resized face)."""
    x = (crop / 255 * 2 - 1).astype(np.float32)[None]
    resized = resize_bilinear_torch(x, resolution, resolution)
    if resolution >= canvas:
        return resized, resized
    p = canvas // 2 - resolution // 2
    return np.pad(resized, ((0, 0), (p, p), (p, p), (0, 0))), resized


def centre(sample: np.ndarray, resolution: int, canvas: int = 1024) -> np.ndarray:
    """The face's part of the sampler output (the centre resolution^2 when it was padded)."""
    if resolution >= canvas:
        return sample
    a, b = canvas // 2 - resolution // 2, canvas // 2 + resolution // 2
    return sample[:, a:b, a:b]


def restored_face(samples_centre: np.ndarray, face_size: int) -> np.ndarray:
    """The face back at face_size: bilinear, *127.5+127.5, rounded, clipped, uint8 (H x W x 3)."""
    x = resize_bilinear_torch(samples_centre, face_size, face_size)[0]
    return (x * np.float32(127.5) + np.float32(127.5)).round().clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- the flow
def upscale_image(img: np.ndarray, upscale: float, min_size: int, unit: int = 32) -> np.ndarray:
    """gradio_demo's upscale_image(unit_resolution=32) through OpenCV: LANCZOS4 when the upscale argument is > 1,
    else INTER_AREA; sides rounded (half to even) to multiples of `unit`."""
    cv = cv2()
    h, w = float(img.shape[0]) * upscale, float(img.shape[1]) * upscale
    if min(h, w) < min_size:
        f = min_size / min(w, h)
        h, w = h * f, w * f
    H, W = int(np.round(h / unit)) * unit, int(np.round(w / unit)) * unit
    return cv.resize(img, (W, H), interpolation=cv.INTER_LANCZOS4 if upscale > 1 else cv.INTER_AREA)


def given_faces(landmarks: Any, scale: tuple[float, float], eye_dist_threshold: float = EYE_DIST_THRESHOLD) -> tuple[list[Face], int]:
    """Faces from landmarks given in input-image pixels ([n, 5, 2]: eyes, nose, mouth corners), scaled by (sx, sy)
    into the aligned image; the detector's eye-distance rule applies to them too."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2) * np.asarray(scale)
    kept = [Face(landmarks=p) for p in pts if eye_distance(p) >= eye_dist_threshold]
    return kept, len(pts) - len(kept)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """The demo's `(x * 127.5 + 127.5).round().clip(0, 255).astype(uint8)`."""
    return (np.asarray(x, np.float32) * np.float32(127.5) + np.float32(127.5)).round().clip(0, 255).astype(np.uint8)


@dataclass
class FaceRun:
    """What face mode found and did (recorded in the output's provenance)."""

    faces: list[Face] = field(default_factory=list)
    dropped_small: int = 0
    source: str = "detector"  # or "given" landmarks
    background: str = "restored"
    to_input: tuple[float, float] = (1.0, 1.0)  # aligned-image pixels -> input pixels (x, y)

    def record(self) -> dict[str, Any]:
        sx, sy = self.to_input
        out = []
        for f in self.faces:
            item: dict[str, Any] = {"landmarks": [[round(float(x) * sx, 2), round(float(y) * sy, 2)] for x, y in f.landmarks],
                                    "caption": f.caption}
            if f.box is not None:
                x1, y1, x2, y2, score = (float(v) for v in f.box)
                item["box"] = [round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)]
                item["score"] = round(score, 4)
            out.append(item)
        return {"found": len(self.faces), "dropped_small": self.dropped_small, "landmarks": self.source,
                "background": self.background, "faces": out}


def restore_with_faces(
    restorer, img: Image.Image, s: RestoreSettings, models: FaceModels, *,
    landmarks: Any = None, on_event: EventCallback | None = None,
):
    """gradio_demo_face.stage2_process with apply_face on: the image upscaled (multiples of 32), faces found (or
    given), each restored alone at s.face_resolution inside an s.face_size canvas with its own caption and the
    run's seed, the background restored (s.face_background) or kept, faces pasted back; the result is resized to
    input size x upscale. Returns (RestoreResult, FaceRun), the result None when no face was found (the caller
    then restores the photo as without face mode)."""
    from .restore import RestoreResult

    cv = cv2()
    rgb = np.asarray(img.convert("RGB"))
    h0, w0 = round(img.height * s.upscale), round(img.width * s.upscale)
    lq = upscale_image(rgb, s.upscale, s.min_size)
    stages: dict[str, StageStats] = {}
    trace = Trace()
    with trace.stage("faces detect"):
        aligned_in = read_image(lq)
        to_aligned = (aligned_in.shape[1] / img.width, aligned_in.shape[0] / img.height)
        if landmarks is not None:
            found, dropped = given_faces(landmarks, to_aligned)
            run = FaceRun(found, dropped, "given")
        else:
            found, dropped = find_faces(models.detector, aligned_in)
            run = FaceRun(found, dropped)
        run.to_input = (1 / to_aligned[0], 1 / to_aligned[1])
        crops = [(f, align(aligned_in, f, s.face_size)) for f in run.faces]
        run.faces = [f for f, c in crops if c is not None]
        crops = [c for _, c in crops if c is not None]
    if not run.faces:
        return None, run
    stages.update(trace.stages)

    bg_caption = _captions(restorer, img, s, run, lq)
    n = len(run.faces)
    restored = []
    for i, (face, crop) in enumerate(zip(run.faces, crops), 1):
        face_in, _ = face_to_input(crop, s.face_resolution, s.face_size)
        out = _sample(restorer, face_in, face.caption, s, stages, "faces ", _face_events(on_event, i, n))
        restored.append(restored_face(centre(out, s.face_resolution, s.face_size), s.face_size))

    if s.face_background:
        bg_trace = Trace(keep=("x_stage1",))
        bg = _to_uint8(_sample(restorer, (lq / 255 * 2 - 1).astype(np.float32)[None], bg_caption, s, stages, "", on_event, bg_trace)[0])
        stage1 = _to_uint8(np.array(bg_trace.tensors["x_stage1"][0]))
    else:
        bg = stage1 = lq
        run.background = "kept"
    with trace.stage("faces paste"):
        labels = [parse_labels(models.parser, f) for f in restored]
        inverses = [inverse_affine(f.affine) for f in run.faces]
        pasted = paste_faces(bg, restored, inverses, labels, size_of=aligned_in.shape[:2])
        if pasted.shape[:2] != (h0, w0):
            grow = h0 * w0 > pasted.shape[0] * pasted.shape[1]
            pasted = cv.resize(pasted, (w0, h0), interpolation=cv.INTER_LANCZOS4 if grow else cv.INTER_AREA)
    stages["faces paste"] = trace.stages["faces paste"]
    stage1 = Image.fromarray(stage1).resize((w0, h0), Image.BICUBIC)
    result = RestoreResult([Image.fromarray(pasted)], [pasted.astype(np.float32) / 255], stage1, bg_caption, s, stages,
                           img.convert("RGB"))
    return result, run


def _plan(restorer, W: int, H: int, s: RestoreSettings):
    """The memory plan of one sampler pass at working size W x H (no captioner resident)."""
    return restorer.plan(W, H, s.updated(upscale=1.0, min_size=64), captioner=False)


def _face_events(on_event: EventCallback | None, i: int, n: int) -> EventCallback | None:
    """Stage events of face i's pass named "face i of n <stage>" (what a progress line shows)."""
    if on_event is None:
        return None
    return lambda e: on_event(e.with_fields(stage=f"face {i} of {n} {e['stage']}") if e.kind == "stage" else e)


def _sample(restorer, x: np.ndarray, caption: str, s: RestoreSettings, stages: dict, prefix: str, on_event,
            trace: Trace | None = None) -> np.ndarray:
    """One official batchify_sample call on [1, H, W, 3] in [-1, 1] with its own caption; like the demo, every call
    starts from the run's seed. The memory plan of this size picks tiles, CFG batching and residency."""
    from ..sampling.tiled import auto_tiling

    H, W = x.shape[1:3]
    plan = _plan(restorer, W, H, s)
    f = restorer.config.vae.downsample_factor
    trace = trace or Trace()
    out = restorer.runner.sample(
        mx.array(x), [caption], s, SeededNoise(s.seed), tiling=auto_tiling(H // f, W // f, plan.unet_tile),
        vae_tiles=restorer._vae_tiles(s, plan), batched_cfg=plan.cfg_batched, staged=plan.staged, on_event=on_event,
        trace=trace,
    )
    for name, st in trace.stages.items():
        acc = stages.setdefault(prefix + name, StageStats())
        acc.seconds += st.seconds
        acc.peak_bytes = max(acc.peak_bytes, st.peak_bytes)
    return np.array(out)


def _captions(restorer, img: Image.Image, s: RestoreSettings, run: FaceRun, lq: np.ndarray) -> str:
    """The background's caption (as a normal restore makes it) and one per face: s.face_prompt, else LLaVA on the
    face cut from the stage-1 image (the demo's llave_process), else empty."""
    staged = _plan(restorer, lq.shape[1], lq.shape[0], s).staged
    bg = s.prompt if s.prompt is not None else (restorer.caption(img, s, staged) if restorer._will_caption(s) else "")
    if s.face_prompt is not None or s.prompt is not None or not restorer._will_caption(s):
        for f in run.faces:
            f.caption = s.face_prompt or ""
        return bg
    from ..captioner import Captioner

    cv = cv2()
    restorer.runner.use(staged, "vae")
    stage1 = _to_uint8(np.array(restorer.runner.denoise_stage1(mx.array((lq / 255 * 2 - 1).astype(np.float32)[None])))[0])
    aligned = read_image(stage1)
    restorer.runner.use(staged)
    with Captioner.load(restorer.captioner_path) as captioner:
        for f in run.faces:
            crop = cv.warpAffine(aligned, f.affine, (s.face_size, s.face_size), borderMode=cv.BORDER_CONSTANT,
                                 borderValue=CROP_BORDER_VALUE)
            f.caption = captioner.caption(Image.fromarray(crop), seed=s.seed)
    mx.clear_cache()
    return bg


def load_face_models(weights: str | None = None, offline: bool = False) -> FaceModels:
    """The detector and parser from a converted folder, or from facexlib's release files (fetched and converted
    once into the weight cache)."""
    from ..weights import hub
    from ..weights.faces import ensure_faces, load_faces

    if weights is None:
        files = hub.fetch({"faces": [hub.FACE_FILES["detector"], hub.FACE_FILES["parser"]]}, offline=offline)["faces"]
        weights = ensure_faces(*files)
    return FaceModels(*load_faces(weights))


def restore_faces(restorer, img: Image.Image, s: RestoreSettings, *, landmarks: Any = None,
                  on_event: EventCallback | None = None):
    """(result, provenance record): the face-mode result, or None with the record saying no face was found."""
    cv2()  # the extra's message before any weight is fetched
    if restorer.face_models is None:
        restorer.face_models = load_face_models()
    result, run = restore_with_faces(restorer, img, s, restorer.face_models, landmarks=landmarks, on_event=on_event)
    record = run.record()
    if result is not None:
        result.faces = record
    return result, record


def face_pass_plan(s: RestoreSettings, weights=None, dtype: str | None = None, quant=None, memory_limit: float | None = None):
    """The memory plan of one face's restore (face_size or face_resolution square, no captioner resident), or the
    MemoryPlanError saying why none fits. `quant`: a QuantSpec, bits as a string, or None (the planner chooses)."""
    from ..config import SUPIRConfig
    from ..memory import MemoryPlanError, plan
    from ..weights.loading import dtype_name
    from ..weights.quantize import QuantSpec
    from .restore import default_dtype

    config = SUPIRConfig.load(weights / "config.json") if weights else SUPIRConfig.sdxl_v0()
    if isinstance(quant, str):
        quant = QuantSpec(bits=int(quant))
    elif quant is None and not weights:
        quant = "auto"  # downloaded weights are quantized as far as the plans need
    side = max(s.face_size, s.face_resolution)
    try:
        return plan(side, side, config=config, dtype=dtype or dtype_name(default_dtype()), captioner=None,
                    memory_limit_gb=memory_limit, quant=quant, unet_tile=s.tile_size)
    except MemoryPlanError as e:
        return e


def describe_face_passes(bg_plan, s: RestoreSettings, weights=None, dtype: str | None = None, quantize: str | None = None,
                         memory_limit: float | None = None) -> str:
    """What face mode adds to a memory plan (the background's, given): detection on the working image, then one
    face-sized restore per face found, each planned like a restore of that size with the same weights."""
    from ..memory import GB, MemoryPlanError

    side = max(s.face_size, s.face_resolution)
    W, H = bg_plan.width, bg_plan.height
    p = face_pass_plan(s, weights, bg_plan.dtype, bg_plan.quant, memory_limit)
    if isinstance(p, MemoryPlanError):
        face = f"DOES NOT FIT: {p}"
    else:
        face = (f"expected peak {p.peak / GB:.2f} GB of {p.budget / GB:.2f} GB, sampler tile {p.unet_tile}, "
                f"CFG {'batch 2' if p.cfg_batched else 'sequential'}")
    det = DETECTOR_BYTES_PER_PIXEL * W * H
    return "\n".join([
        f"  face mode: detector + parser weights {FACE_NETS_BYTES / GB:.2f} GB; detection on the {W}x{H} working image "
        f"+{det / GB:.2f} GB, parsing each face +{PARSER_ACTIVATION_BYTES / GB:.2f} GB (both outside the sampler passes);",
        f"  then one {side}x{side} restore per face found ({face}), each with its own caption,",
        f"  and the background restore above{'' if s.face_background else ' (skipped: background kept)'}: "
        f"a photo with n faces runs n{' + 1' if s.face_background else ''} restores",
    ])

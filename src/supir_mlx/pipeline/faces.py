"""Face mode geometry: the official FaceRestoreHelper (SUPIR/utils/face_restoration_helper.py) as used by
gradio_demo_face.py, and the per-face glue around the sampler.

Detection runs on a copy whose short side is at least 640 px; faces whose eyes are closer than 5 px are dropped;
each face is aligned onto the FFHQ 5-point template and cropped at `face_size`; after restoration it is warped
back and blended with a soft square mask limited by a ParseNet face mask. The geometry goes through OpenCV
(estimateAffinePartial2D, warpAffine, erode, GaussianBlur, resize) exactly as the official code calls it, so
crops and pasted pixels match it to the last bit; OpenCV comes with the `faces` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..models.parsenet import ParseNet
from ..models.retinaface import RetinaFace, detect_faces

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
        if np.linalg.norm([row[5] - row[7], row[6] - row[8]]) < eye_dist_threshold:
            dropped += 1
            continue
        faces.append(Face(landmarks=row[5:15].reshape(5, 2), box=row[:5]))
    return faces, dropped


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
    bg: np.ndarray, restored: list[np.ndarray], inverses: list[np.ndarray], labels: list[np.ndarray]
) -> np.ndarray:
    """paste_faces_to_input_image(upsample_img=bg) at upscale 1: each face warped back and blended onto the running
    result with min(soft square mask, blurred parse mask); truncated to uint8 at the end."""
    cv = cv2()
    h, w = bg.shape[:2]
    out = bg
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

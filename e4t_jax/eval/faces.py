"""Face identity and face masks, with dlib (the optional ``faces`` extra).

Identity as the E4T paper measures it: the distance between face descriptors of the
input face and of a generated one. The descriptor is dlib's ResNet face recognition
model (``dlib_face_recognition_resnet_model_v1.dat``, 128 numbers, 99.38% on LFW; two
faces whose descriptors are less than 0.6 apart are the same person by dlib's rule).
Faces are found by dlib's HOG frontal face detector (one upsampling, so faces from
about 40 pixels wide) and aligned by its 68-point shape predictor
(``shape_predictor_68_face_landmarks.dat``). The weights come from the
``face-recognition-models`` package; install both with::

    pip install "e4t-jax[faces]"      # dlib-bin (a prebuilt dlib) + face-recognition-models

An image without a detectable face has no identity: :func:`identity_distance` returns
:data:`NO_FACE` (printed and reported as the string ``"no face"``, see
:func:`format_distance`), never a number. Any embedding function can replace dlib's
(``embed=``, e.g. an ArcFace model): it takes ``uint8 [H, W, 3]`` and returns a 1-D
embedding, or None when it finds no face.

Face masks for the masked diffusion loss (the paper masks faces with a segmentation
network; this is a landmark approximation): :func:`face_mask` fills the convex hull of
the 68 landmarks (jaw line, eyebrows, nose, eyes, mouth) and dilates it by
:data:`MASK_DILATION` (0.15) of the face size, the larger side of the landmarks'
bounding box, which takes in the forehead and the jaw's edge. ``e4t-personalize
--mask auto`` uses it.
"""
from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from e4t_jax.errors import UserError

#: dlib's same-person threshold on the Euclidean distance of its descriptors.
SAME_PERSON_THRESHOLD = 0.6

#: Dilation of the landmark hull in :func:`face_mask`, as a fraction of the face size.
MASK_DILATION = 0.15

#: Upsamplings of the image before HOG detection (1: faces down to ~40 px wide).
UPSAMPLE = 1

INSTALL_HINT = 'pip install "e4t-jax[faces]"'

# dlib's models are shared by the threads of a process (e.g. grain's reading threads); its ResNet
# keeps per-call state in the network, so calls into dlib take turns (processes run in parallel).
_LOCK = threading.RLock()
NO_FACE_TEXT = "no face"


class _NoFace:
    """The identity distance of an image without a face: falsy, not a number, ``str`` is ``"no face"``."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_FACE"

    def __str__(self) -> str:
        return NO_FACE_TEXT

    def __bool__(self) -> bool:
        return False

    def __reduce__(self):
        return (_NoFace, ())


#: What :func:`identity_distance` returns when either image has no detectable face.
NO_FACE = _NoFace()


class FacesUnavailable(UserError, ImportError):
    """dlib or its model files are not installed (the ``faces`` extra)."""


class NoFaceError(UserError):
    """An operation that needs a face (a face mask) found none."""


@functools.lru_cache(maxsize=1)
def _dlib():
    """``(dlib, detector, shape predictor, recognizer)``, loaded once.

    The model files are found inside the ``face_recognition_models`` package without
    importing it (its ``__init__`` needs ``pkg_resources``, gone from recent setuptools).
    """
    try:
        import dlib
    except ImportError as error:
        raise FacesUnavailable(f"face identity and face masks need dlib: {INSTALL_HINT} ({error})") from None
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacesUnavailable(f"face identity and face masks need the face-recognition-models weights: {INSTALL_HINT}")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    landmarks = models / "shape_predictor_68_face_landmarks.dat"
    resnet = models / "dlib_face_recognition_resnet_model_v1.dat"
    for file in (landmarks, resnet):
        if not file.is_file():
            raise FacesUnavailable(f"{file} is missing: reinstall the weights, {INSTALL_HINT}")
    return (dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(landmarks)),
            dlib.face_recognition_model_v1(str(resnet)))


def require() -> None:
    """Loads dlib and its weights now (once per process).

    Raises:
      FacesUnavailable: naming the install line.
    """
    _dlib()


def available() -> bool:
    """Whether dlib and its weights are installed."""
    try:
        _dlib()
        return True
    except FacesUnavailable:
        return False


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` (float images in [0, 1] are scaled), C-contiguous as dlib needs."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _detections(image: np.ndarray) -> list:
    """dlib rectangles of the faces in a uint8 image, the most confident first."""
    _, detector, _, _ = _dlib()
    with _LOCK:
        rects, scores, _ = detector.run(image, UPSAMPLE, 0.0)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return [rects[int(i)] for i in order]


def face_boxes(image: np.ndarray) -> np.ndarray:
    """Detected faces: int64 ``[N, 4]`` boxes ``(left, top, right, bottom)`` in pixels, the most
    confident first (``N = 0``: no face). ``image``: uint8 ``[H, W, 3]`` (or float in [0, 1])."""
    rects = _detections(_as_uint8(image))
    return np.asarray([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.int64).reshape(-1, 4)


def _shapes(image: np.ndarray) -> list:
    _, _, predictor, _ = _dlib()
    rects = _detections(image)
    with _LOCK:
        return [predictor(image, rect) for rect in rects]


def face_landmarks(image: np.ndarray) -> np.ndarray:
    """The 68 landmarks of each detected face: float32 ``[N, 68, 2]`` as ``(x, y)`` pixels, the
    most confident face first (iBUG 300-W order: 0-16 jaw, 17-26 eyebrows, 27-35 nose,
    36-47 eyes, 48-67 mouth)."""
    shapes = _shapes(_as_uint8(image))
    return np.asarray([[(p.x, p.y) for p in shape.parts()] for shape in shapes], np.float32).reshape(-1, 68, 2)


def embed_faces(image: np.ndarray) -> np.ndarray:
    """dlib face descriptors of every detected face: float32 ``[N, 128]``, the most confident first.

    Args:
      image: uint8 ``[H, W, 3]`` RGB (float in [0, 1] is scaled).

    Returns:
      ``[N, 128]``; ``N = 0`` when there is no face.
    """
    image = _as_uint8(image)
    _, _, _, recognizer = _dlib()
    shapes = _shapes(image)
    with _LOCK:
        descriptors = [np.asarray(recognizer.compute_face_descriptor(image, shape), np.float32) for shape in shapes]
    return np.asarray(descriptors, np.float32).reshape(-1, 128)


def embed_face(image: np.ndarray) -> np.ndarray | None:
    """The descriptor float32 ``[128]`` of the most confident face, or None without a face."""
    embeddings = embed_faces(image)
    return embeddings[0] if len(embeddings) else None


def euclidean(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two 1-D embeddings (dlib's metric)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - cos`` of two 1-D embeddings (the usual metric of ArcFace-like models)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(1.0 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def identity_distance(a: np.ndarray, b: np.ndarray,
                      embed: Callable[[np.ndarray], np.ndarray | None] = embed_face,
                      metric: Callable[[np.ndarray, np.ndarray], float] = euclidean) -> float | _NoFace:
    """How far apart the faces of two images are.

    Args:
      a, b: uint8 ``[H, W, 3]`` images (e.g. the concept image and a generation).
      embed: image -> 1-D embedding of its main face, or None when it has none
        (default :func:`embed_face`, dlib's descriptor; plug in ArcFace etc. here).
      metric: distance of two embeddings (default :func:`euclidean`; dlib's threshold
        0.6 applies to it).

    Returns:
      The distance (float), or :data:`NO_FACE` when either image has no face: never a
      number then, so an average over a set of generations cannot silently include it.
    """
    first = embed(a)
    if first is None:
        return NO_FACE
    second = embed(b)
    if second is None:
        return NO_FACE
    return float(metric(first, second))


def same_person(distance: float | _NoFace, threshold: float = SAME_PERSON_THRESHOLD) -> bool:
    """``distance < threshold`` (dlib's rule for its descriptor); :data:`NO_FACE` is never the same person."""
    if distance is NO_FACE or distance is None:
        return False
    return float(distance) < threshold


def format_distance(distance: float | _NoFace, digits: int = 3) -> str:
    """A distance for a report: ``"0.312"``, or ``"no face"`` (:data:`NO_FACE_TEXT`)."""
    if distance is NO_FACE or distance is None:
        return NO_FACE_TEXT
    return f"{float(distance):.{digits}f}"


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of ``[P, 2]`` points (Andrew's monotone chain), counter-clockwise ``[K, 2]``."""
    pts = sorted(set(map(tuple, np.asarray(points, np.float64))))
    if len(pts) < 3:
        return np.asarray(pts, np.float64)

    def half(sequence):
        chain = []
        for p in sequence:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(reversed(pts))
    return np.asarray(lower[:-1] + upper[:-1], np.float64)


def mask_from_landmarks(landmarks: np.ndarray, height: int, width: int,
                        dilation: float = MASK_DILATION) -> np.ndarray:
    """The mask of faces given their landmarks (what :func:`face_mask` draws).

    Args:
      landmarks: float ``[N, P, 2]`` (or ``[P, 2]``) ``(x, y)`` pixel positions.
      height, width: the image size.
      dilation: the hull grows by ``dilation * size`` pixels in every direction, ``size``
        being the larger side of each face's landmark bounding box.

    Returns:
      uint8 ``[height, width, 3]``: 255 inside the dilated hulls, 0 elsewhere.
    """
    landmarks = np.asarray(landmarks, np.float64).reshape(-1, *np.shape(landmarks)[-2:])
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(angles), np.sin(angles)], -1)
    for points in landmarks:
        size = float(np.max(points.max(0) - points.min(0)))
        radius = dilation * size
        # The dilated hull is the hull of a disk around every landmark (a Minkowski sum).
        grown = (points[:, None, :] + radius * circle[None]).reshape(-1, 2) if radius > 0 else points
        hull = _hull(grown)
        if len(hull) >= 3:
            draw.polygon([tuple(p) for p in hull], fill=255)
    return np.repeat(np.asarray(canvas, np.uint8)[..., None], 3, axis=-1)


def face_mask(image: np.ndarray, dilation: float = MASK_DILATION, *, all_faces: bool = False,
              what: str = "the image") -> np.ndarray:
    """A loss mask of the face in ``image``: white = face.

    Args:
      image: uint8 ``[H, W, 3]`` (float in [0, 1] is scaled).
      dilation: growth of the landmarks' convex hull, a fraction of the face size
        (see :func:`mask_from_landmarks`; default :data:`MASK_DILATION`).
      all_faces: mask every detected face, not only the most confident one.
      what: how the error message names the image (e.g. its file name).

    Returns:
      uint8 ``[H, W, 3]``, 255 on the face and 0 elsewhere (the mask format of
      :func:`e4t_jax.training.data.augmented_batch`).

    Raises:
      NoFaceError: no face found (one line).
      FacesUnavailable: dlib is not installed.
    """
    image = _as_uint8(image)
    landmarks = face_landmarks(image)
    if not len(landmarks):
        raise NoFaceError(f"no face found in {what} (dlib's frontal face detector): an automatic face mask needs "
                          "a visible frontal face; pass a mask image instead")
    if not all_faces:
        landmarks = landmarks[:1]
    return mask_from_landmarks(landmarks, image.shape[0], image.shape[1], dilation)

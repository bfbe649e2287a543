"""animeface's face detection without its colour analysis: boxes and likelihoods only, and it always returns.

Design notes: docs/architecture.md, `detect/animeface_boxes.py`.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from functools import cache

from PIL import Image

MAX_FACES = 4096  # _nvxs.c: NV_MAX_FACE
# _nvxs.c: do_detect's arguments to nv_face_detect
STEP = 4.0
SCALE_FACTOR = 1.095
MIN_WINDOW_SIZE = 42.592
LAPLACIAN_LEVEL = 4.0


class _Matrix(ctypes.Structure):  # nv_core_matrix.h: nv_matrix_t
    _fields_ = [
        ("list", ctypes.c_int),
        ("list_step", ctypes.c_uint),
        ("n", ctypes.c_int),
        ("m", ctypes.c_int),
        ("rows", ctypes.c_int),
        ("cols", ctypes.c_int),
        ("step", ctypes.c_int),
        ("alias", ctypes.c_int),
        ("v", ctypes.POINTER(ctypes.c_float)),
    ]


class _Rect(ctypes.Structure):  # nv_core_util.h: nv_rect_t
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("width", ctypes.c_int), ("height", ctypes.c_int)]


class _FacePosition(ctypes.Structure):  # nv_face_detect.h: nv_face_position_t
    _fields_ = [
        ("likelihood", ctypes.c_float),
        ("face", _Rect),
        ("left_eye", _Rect),
        ("right_eye", _Rect),
        ("nose", _Rect),
        ("mouth", _Rect),
        ("chin", _Rect),
    ]


@dataclass(frozen=True)
class Face:
    x: int
    y: int
    width: int
    height: int
    likelihood: float


_MatrixP = ctypes.POINTER(_Matrix)
_lock = threading.Lock()  # the face buffer below is shared; the C code itself keeps no state for this stage


@cache
def _library() -> ctypes.CDLL:
    import animeface._nvxs as extension  # loads libnvxs, whose symbols dlsym then finds through this handle

    lib = ctypes.CDLL(extension.__file__)
    lib.nv_matrix3d_alloc.restype = _MatrixP
    lib.nv_matrix3d_alloc.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.nv_matrix_zero.argtypes = [_MatrixP]
    lib.nv_matrix_free.argtypes = [ctypes.POINTER(_MatrixP)]
    lib.nv_gray.argtypes = [_MatrixP, _MatrixP]
    lib.nv_gaussian5x5.argtypes = [_MatrixP, ctypes.c_int, _MatrixP, ctypes.c_int]
    lib.nv_laplacian1.argtypes = [_MatrixP, _MatrixP, ctypes.c_float]
    lib.nv_integral.argtypes = [_MatrixP, _MatrixP, ctypes.c_int]
    lib.nv_face_detect.restype = ctypes.c_int
    lib.nv_face_detect.argtypes = [
        ctypes.POINTER(_FacePosition),
        ctypes.c_int,
        _MatrixP,
        _MatrixP,
        ctypes.POINTER(_Rect),
        ctypes.c_void_p,  # dir_mlp
        ctypes.c_void_p,  # detector_mlp
        ctypes.POINTER(ctypes.c_void_p),  # bagging_mlp: NULL-terminated array
        ctypes.c_int,
        ctypes.c_void_p,  # parts_mlp
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_float,
    ]
    return lib


def _net(lib: ctypes.CDLL, name: str) -> int:
    """Address of one of the trained nets (an exported `nv_mlp_t` data symbol)."""
    return ctypes.addressof(ctypes.c_char.in_dll(lib, name))


def _values(matrix: ctypes._Pointer[_Matrix]):
    """The matrix's floats as a (rows*cols, step) numpy view (no copy)."""
    import numpy as np

    mat = matrix.contents
    return np.ctypeslib.as_array(mat.v, shape=(mat.rows * mat.cols, mat.step))


def _gray(lib: ctypes.CDLL, image: Image.Image) -> ctypes._Pointer[_Matrix]:
    """The grey matrix `_nvxs.c: convert_imaging_to_nv` makes: nvxs's own nv_gray for colour, the value for L."""
    import numpy as np

    if image.mode not in ("RGB", "L"):  # animeface.detect's conversions
        image = image.convert("L" if image.mode == "1" else "RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    rows, cols = image.height, image.width
    gray = lib.nv_matrix3d_alloc(1, rows, cols)
    lib.nv_matrix_zero(gray)
    if image.mode == "L":
        _values(gray)[:, 0] = pixels.reshape(-1)
        return gray
    bgr = lib.nv_matrix3d_alloc(3, rows, cols)
    try:
        lib.nv_matrix_zero(bgr)
        _values(bgr)[:, :3] = pixels.reshape(-1, 3)[:, ::-1]  # nvxs keeps channels as B, G, R
        lib.nv_gray(gray, bgr)
    finally:
        lib.nv_matrix_free(ctypes.byref(bgr))
    return gray


def detect(image: Image.Image) -> list[Face]:
    """Every face animeface finds in `image`, as `animeface.detect` would report its box and likelihood."""
    return [Face(p.face.x, p.face.y, p.face.width, p.face.height, float(p.likelihood)) for p in positions(image)]


def positions(image: Image.Image) -> list[_FacePosition]:
    """nv_face_detect's full records (face, eyes, nose, mouth, chin boxes), copied out of the shared buffer."""
    if image.width < 1 or image.height < 1:
        return []
    lib = _library()
    gray = _gray(lib, image)
    rows, cols = image.height, image.width
    smooth = lib.nv_matrix3d_alloc(1, rows, cols)
    edge = lib.nv_matrix3d_alloc(1, rows, cols)
    gray_integral = lib.nv_matrix3d_alloc(1, rows + 1, cols + 1)
    edge_integral = lib.nv_matrix3d_alloc(1, rows + 1, cols + 1)
    matrices = (gray, smooth, edge, gray_integral, edge_integral)
    try:
        for matrix in matrices[1:]:
            lib.nv_matrix_zero(matrix)
        lib.nv_gaussian5x5(smooth, 0, gray, 0)
        lib.nv_laplacian1(edge, smooth, LAPLACIAN_LEVEL)
        lib.nv_integral(gray_integral, gray, 0)
        lib.nv_integral(edge_integral, edge, 0)
        size = _Rect(0, 0, cols, rows)
        bagging = (ctypes.c_void_p * 3)(_net(lib, "nv_face_mlp_face_01"), _net(lib, "nv_face_mlp_face_02"), None)
        with _lock:
            faces = _faces_buffer()
            count = lib.nv_face_detect(
                faces,
                MAX_FACES,
                gray_integral,
                edge_integral,
                ctypes.byref(size),
                _net(lib, "nv_face_mlp_dir"),
                _net(lib, "nv_face_mlp_face_00"),
                bagging,
                2,
                _net(lib, "nv_face_mlp_parts"),
                STEP,
                SCALE_FACTOR,
                MIN_WINDOW_SIZE,
            )
            return [_FacePosition.from_buffer_copy(faces[i]) for i in range(count)]
    finally:
        for matrix in matrices:
            lib.nv_matrix_free(ctypes.byref(matrix))


@cache
def _faces_buffer():
    """nv_face_detect's output array, ~400 KB, made once per process (the C code keeps it on the stack)."""
    return (_FacePosition * MAX_FACES)()

"""`python -m tests.support.face_check_calls CALLS`: the issue 17 reproducer, run in a process of its own.

It takes the face animeface finds in raw/sakurauchi_riko/12.png (box 211,145,106,106) and runs the face
check's measurements (`detect.verify.features`: animeface and the cascade on crops at margins 0.25 and 0.5)
CALLS times. With animeface.detect behind it, call 146 of animeface on such a crop never returned (issue 17).
It seeds animeface's C random generator first, and prints as JSON whether any random number was drawn
during the calls: only animeface's colour analysis draws them, so "drawn": false shows it never ran.
"""

from __future__ import annotations

import ctypes
import json
import sys

from core.images import open_image
from detect.detectors import Detection
from detect.verify import features
from tests.support.testdata import raw_image

REPRODUCER = ("sakurauchi_riko/12.png", Detection(211, 145, 106, 106, "animeface", 1.0))
SEED = 8273  # the generator's own start value


def _generator():
    import animeface._nvxs as extension

    lib = ctypes.CDLL(extension.__file__)
    lib.nv_srand.argtypes = [ctypes.c_ulong]
    lib.nv_rand.restype = ctypes.c_float
    return lib


def main(calls: int) -> None:
    name, det = REPRODUCER
    image = open_image(raw_image(name))
    lib = _generator()
    lib.nv_srand(SEED)
    untouched = lib.nv_rand()  # the first number of a fresh generator
    lib.nv_srand(SEED)
    values = [features(image, det) for _ in range(calls)]
    print(json.dumps({"calls": len(values), "drawn": lib.nv_rand() != untouched, "last": values[-1]}))


if __name__ == "__main__":
    main(int(sys.argv[1]))

"""Near-duplicate faces (the same picture reposted, resized or recompressed) by perceptual hash, with an
index whose lookup cost does not grow with the collection.

A 64-bit pHash is cut into 8 one-byte bands (table face_hash_band). Two hashes within 7 bits of each
other agree on at least one band (8 bands, at most 7 of them touched by the differing bits), so the
lookup fetches only faces that share a band with the new one and compares those. Distances above 7 fall
back to a full scan (slow, and never the default: WAIFU_NEAR_DUPLICATE_DISTANCE is 6).
"""

from __future__ import annotations

from PIL import Image
from sqlalchemy import union
from sqlmodel import Session, col, select

from db.models import Face, FaceHashBand, FaceState, pk

BANDS = 8
MAX_INDEXED_DISTANCE = BANDS - 1


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def perceptual_hash(image: Image.Image) -> str:
    import imagehash

    return str(imagehash.phash(image))


def bands(phash: str) -> list[tuple[int, int]]:
    value = int(phash, 16)
    return [(band, (value >> (8 * band)) & 0xFF) for band in range(BANDS)]


def candidates(phash: str):
    """(face id, phash) of indexed faces sharing at least one band with `phash`: one index range per band,
    on the band table alone."""
    return union(
        *(
            select(FaceHashBand.face_id, FaceHashBand.phash).where(
                FaceHashBand.band == band, FaceHashBand.value == value
            )
            for band, value in bands(phash)
        )
    )


def find_near_duplicate(session: Session, face_id: int | None, phash: str, max_distance: int) -> Face | None:
    """The earliest ready face that shows the same picture, or None; follows that face to its own original."""
    if max_distance <= MAX_INDEXED_DISTANCE:
        rows = session.exec(candidates(phash)).all()
    else:
        rows = session.exec(
            select(Face.id, Face.phash).where(Face.state == FaceState.ready, col(Face.phash).is_not(None))
        ).all()
    close = sorted(
        other_id
        for other_id, other_phash in rows
        if other_id != face_id and hamming(other_phash, phash) <= max_distance
    )
    for other_id in close:  # few: a picture and its reposts
        other = session.get(Face, other_id)
        if other is not None and other.state == FaceState.ready:
            return session.get(Face, other.duplicate_of) if other.duplicate_of else other
    return None


def index_face(session: Session, face: Face) -> None:
    """Adds a ready face's bands to the index (in the caller's transaction)."""
    if face.phash is None:  # not cropped: nothing to index
        return
    phash = face.phash
    session.add_all(FaceHashBand(band=b, value=v, face_id=pk(face), phash=phash) for b, v in bands(phash))

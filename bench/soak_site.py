"""What the soak's fake safebooru publishes, and the ledger of it: the real test illustrations (reused with a
trailer after the image's end when the set runs out, so each post has its own md5), bursts longer than a page
with one unusable entry, file and API faults, the picture that hangs detection and the 16-bit PNG near the
pixel cap. Runs in the soak's event loop, the same one that serves the fake (so no lock is needed)."""

from __future__ import annotations

import hashlib
import io
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.support.fake_safebooru import FakePost, FakeSafebooru

# faults a few normal posts carry (tests/support/fake_safebooru.py FILE_FAULTS); all end in a terminal row
FILE_FAULTS = ["503_once", "429_once", "slow_once", "404", "truncated", "md5_mismatch"]
API_FAULTS = ["503", "429", "malformed", "empty"]
HANG_SIZE = (641, 479)  # a size no test illustration has: the soak hook (bench/soak_hook) hangs on it


@dataclass
class Published:
    id: int
    tag: str
    kind: str  # normal | fault:<name> | unusable | hang | big_png | withheld
    at: float  # unix time it became visible (withheld: when it would have)
    usable: bool = True  # an entry the poller must turn into a row (unusable: a failed stub or no row is fine)

    def as_dict(self) -> dict:
        return asdict(self)


class Publisher:
    def __init__(self, fake: FakeSafebooru, images: list[tuple[str, Path]], tags: list[str], seed: int) -> None:
        self.fake = fake
        self.files = [(tag, path.read_bytes(), path.suffix.lower()) for tag, path in images]
        self.tags = tags
        self.random = random.Random(seed)
        self.ledger: list[Published] = []
        self.used = 0
        self.next_id = 1001

    def _bytes_for(self, tag: str) -> tuple[bytes, str]:
        own = [f for f in self.files if f[0] == tag] or self.files
        _, data, suffix = own[self.used % len(own)]
        rounds = self.used // len(own)
        self.used += 1
        # decoders stop at the image's end marker: the trailer changes the md5, not the picture
        return (data + b"\0soak-" + str(rounds).encode() if rounds else data), suffix

    def _add(self, tag: str, data: bytes, suffix: str, kind: str, fault: str | None = None) -> Published:
        post = FakePost(
            id=self.next_id,
            tags=f"1girl {tag} solo",
            data=data,
            image=f"{hashlib.md5(data).hexdigest()}{suffix}",
            directory=str(1000 + self.next_id // 1000),
            fault=fault,
        )
        self.next_id += 1
        if kind != "withheld":
            self.fake.add(post)
        entry = Published(post.id, tag, kind, time.time(), usable=kind != "unusable")
        self.ledger.append(entry)
        return entry

    def publish(self, count: int, fault_share: float = 0.05) -> list[Published]:
        """`count` new posts across the tracked tags; a few carry a file fault."""
        out = []
        for _ in range(count):
            tag = self.random.choice(self.tags)
            data, suffix = self._bytes_for(tag)
            fault = self.random.choice(FILE_FAULTS) if self.random.random() < fault_share else None
            out.append(self._add(tag, data, suffix, f"fault:{fault}" if fault else "normal", fault))
        return out

    def burst(self, page_size: int) -> list[Published]:
        """A gap longer than a page on one tag, with one unusable entry (an md5 that is no md5) in the middle
        of a full page."""
        tag = self.random.choice(self.tags)
        size = page_size + page_size // 2 + 1
        out = []
        for i in range(size):
            data, suffix = self._bytes_for(tag)
            if i == page_size // 2:
                entry = self._add(tag, data, suffix, "unusable")
                self.fake.entry_overrides[entry.id] = {"hash": "not-an-md5", "md5": "not-an-md5"}
            else:
                entry = self._add(tag, data, suffix, "normal")
            out.append(entry)
        return out

    def withheld(self) -> Published:
        """Counted as published, never listed: the soak must report it lost (its own accounting check)."""
        tag = self.random.choice(self.tags)
        data, suffix = self._bytes_for(tag)
        return self._add(tag, data, suffix, "withheld")

    def hang_picture(self) -> Published:
        """A real illustration resized to HANG_SIZE: the soak hook makes its face detection hang."""
        from PIL import Image

        tag = self.random.choice(self.tags)
        data, _ = self._bytes_for(tag)
        with Image.open(io.BytesIO(data)) as im:
            out = io.BytesIO()
            im.convert("RGB").resize(HANG_SIZE).save(out, "PNG")
        return self._add(tag, out.getvalue(), ".png", "hang")

    def big_png(self, pixels: int) -> Published:
        """A 16-bit greyscale PNG of about `pixels` pixels: a few hundred KB on the wire, a float array of about
        28 bytes a pixel once converted (issue 17)."""
        from PIL import Image, ImageDraw

        side = int(pixels**0.5)
        im = Image.new("I;16", (side, side), 0)
        ImageDraw.Draw(im).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=40000)
        out = io.BytesIO()
        im.save(out, "PNG", compress_level=9)
        return self._add(self.random.choice(self.tags), out.getvalue(), ".png", "big_png")

    def api_fault(self) -> str:
        fault = self.random.choice(API_FAULTS)
        self.fake.api_faults.append(fault)
        return fault

"""The result of one merge."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from novita_async._output import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["MergeFaceResult"]


@dataclass(frozen=True)
class MergeFaceResult:
    """A merged image, in memory or on disk.

    Attributes:
        image_type: The format the server reported (``"png"``, ``"webp"``, ``"jpeg"``).
        path: Where the image was written, when ``output`` was given; else None.
        data: The image bytes, when no ``output`` was given; else None.
        attempts: How many attempts it took (1 = no retry).
        elapsed: Seconds from the first attempt to the result, waits included.
    """

    image_type: str
    path: Path | None
    data: bytes | None
    attempts: int
    elapsed: float

    def read_bytes(self) -> bytes:
        """The image bytes, from memory or from ``path`` (blocking read)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the image to ``path`` atomically and return it (blocking).

        Example:
            >>> result.save("out/merged.png")  # doctest: +SKIP
        """
        target = Path(path)
        atomic_write_bytes(target, self.read_bytes())
        return target

    def to_pil(self) -> Image.Image:
        """The image as a loaded ``PIL.Image.Image``."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.read_bytes()) if self.path is None else self.path)
        image.load()
        return image

    def __repr__(self) -> str:
        where = f"path={str(self.path)!r}" if self.path else f"data=<{len(self.data or b'')} bytes>"
        return (
            f"MergeFaceResult(image_type={self.image_type!r}, {where}, "
            f"attempts={self.attempts}, elapsed={self.elapsed:.3f})"
        )

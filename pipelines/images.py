"""The one way an image file is opened outside DALI: under a pixel limit, with DALI's formats.

Everything that decodes a user's image with PIL goes through :func:`open_image` or
:func:`load_rgb`: ``bt-fast data check`` (which decides what the DALI pipeline will
read), evaluation, the torchvision reference recipe and ``bt-fast report``. Two rules:

- **Pixel limit.** The header's width x height is checked before anything is decoded:
  an image claiming 20000 x 20000 would take 1.2 GB as RGB. The limit is
  ``DEFAULT_MAX_PIXELS`` (64 megapixels; ImageNet's largest image has about 15) or the
  environment variable ``BT_FAST_MAX_IMAGE_PIXELS``.
- **DALI's formats.** ``DECODABLE`` are the formats DALI 2.4's CPU decoder
  (``fn.decoders.image``) decoded in tests/test_trust_data.py, whatever the file's
  name says (it reads the content, not the extension). PIL also reads GIF, ICO, TGA and
  more, which stop a DALI pipeline: a GIF named ``.jpg`` is refused here, so ``data
  check`` never lists what the trainer cannot read.

Problems are ``SourceError`` naming the file (the trainer's CLI prints one line).
"""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager

from .errors import SourceError

DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "BT_FAST_MAX_IMAGE_PIXELS"
DECODABLE = frozenset({"JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF", "PPM", "JPEG2000"})
"""PIL format names whose files DALI's CPU decoder decodes (MPO: a camera's multi-picture
JPEG, decoded as its first picture; PPM: PIL's name for PBM/PGM/PPM)."""


def max_pixels() -> int:
    """The pixel limit: BT_FAST_MAX_IMAGE_PIXELS if set (a positive integer), else 64 M."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    if not raw.isascii() or not raw.isdigit() or int(raw) <= 0:
        raise SourceError(f"{MAX_PIXELS_ENV}={raw[:40]!r}: expected a positive whole number of pixels")
    return int(raw)


@contextmanager
def open_image(path: str | os.PathLike, data: bytes | None = None):
    """A PIL image whose header passed both rules, not yet decoded; SourceError otherwise.

    ``data``: the file's bytes when they do not come from ``path`` itself (a WebDataset
    member; ``path`` then only names it in messages)."""
    from PIL import Image  # the decoder: only what opens images needs it

    limit = max_pixels()
    if data is None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise SourceError(f"{path}: {e.strerror or type(e).__name__}") from None
        if not stat.S_ISREG(mode):  # a FIFO would block the open forever, a device never end
            raise SourceError(f"{path}: not a regular file")
    # The check below replaces PIL's own (a warning at 89 M pixels, an error at twice
    # that, both global): one limit, one message naming the size and the setting.
    Image.MAX_IMAGE_PIXELS = None
    try:
        im = Image.open(path if data is None else io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise SourceError(f"{path}: not an image file PIL or DALI can read") from None
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror or type(e).__name__}") from None
    with im:
        if im.format not in DECODABLE:
            raise SourceError(f"{path}: a {im.format} image, which the pipeline's decoder (DALI) cannot "
                              "read; convert it to JPEG or PNG")
        w, h = im.size
        if w * h > limit:
            raise SourceError(f"{path}: {w}x{h} = {w * h} pixels is over the limit of {limit} "
                              f"(set {MAX_PIXELS_ENV} to raise it)")
        yield im


def load_rgb(path: str | os.PathLike):
    """The fully decoded RGB PIL image at ``path``; SourceError naming it if it cannot be."""
    with open_image(path) as im:
        try:
            return im.convert("RGB")  # decodes: a truncated file fails here
        except (OSError, SyntaxError, ValueError, MemoryError) as e:  # PIL's bad-data errors
            raise SourceError(f"{path}: cannot be decoded ({type(e).__name__}: {e})") from None


def header_problem(path: str | os.PathLike) -> str | None:
    """Why the header of ``path`` fails the two rules (or the file is missing), else None.

    Reads the header only (~0.2 ms a file): what the DALI reader checks of a file list
    that ``data check`` did not write, since DALI itself would decode any size.
    """
    try:
        with open_image(path):
            return None
    except SourceError as e:
        return str(e).removeprefix(f"{path}: ")


def decode_problem(path: str | os.PathLike, data: bytes | None = None) -> str | None:
    """Why the image (at ``path``, or ``data`` named ``path``) fails the rules or does not
    fully decode, else None: what ``data check`` and the readers' post-mortems ask."""
    try:
        with open_image(path, data) as im:
            im.load()
        return None
    except SourceError as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return f"{type(e).__name__}: {e}"

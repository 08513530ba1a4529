"""Which files a request may make the app read: the one gate every endpoint and gallery item goes through.

A request names files by path (Gradio's FileData payloads, gallery items). The app reads a named file only when
it lies, once resolved (`..`, symlinks, case), inside Gradio's upload folder (where Gradio stores what a visitor
uploaded to this server, and its cache of example files) or the app's own example folder. Anything else is
refused before it is opened or stat'ed, with one message whether or not the file exists, so that a request
learns nothing about the server's files. The command line (`python -m blip2`) reads local paths: that is its job,
and it does not come through here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RequestError
from .paths import EXAMPLES_DIR

NOT_UPLOADED = "the image was not uploaded to this app: upload it again"


class NotUploaded(RequestError):
    """A path a request may not make the app read (or one that is gone); its message is always NOT_UPLOADED."""

    def __init__(self):
        super().__init__(NOT_UPLOADED)


def upload_folder() -> str:
    """Gradio's own upload / cache folder (GRADIO_TEMP_DIR, else <tmp>/gradio), as Gradio computes it."""
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def readable_roots(folders=None) -> list[str]:
    """The folders whose files a request may name (default: the upload folder and the examples), resolved and
    case-normalised."""
    return [_norm(os.path.realpath(p)) for p in folders or (upload_folder(), EXAMPLES_DIR)]


def _norm(path: str) -> str:
    return os.path.normcase(os.path.normpath(path))


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def request_file(path: str | os.PathLike) -> Path:
    """The resolved path of a file a request names, or NotUploaded.

    Two checks: first on the text of the path alone (made absolute, `..` folded; no file-system access), so a
    path outside the readable folders is refused untouched; then on the resolved path (symlinks followed), so a
    link inside the upload folder that points elsewhere is refused too, as is a missing file."""
    try:
        raw = os.fspath(path)
    except TypeError:
        raise NotUploaded() from None
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise NotUploaded()
    folders = (upload_folder(), EXAMPLES_DIR)
    roots = readable_roots(folders)
    lexical = _norm(os.path.abspath(raw))
    if not _inside(lexical, roots + [_norm(os.path.abspath(p)) for p in folders]):  # as written, or resolved
        raise NotUploaded()
    real = os.path.realpath(lexical)
    if not _inside(_norm(real), roots) or not os.path.isfile(real):
        raise NotUploaded()
    return Path(real)

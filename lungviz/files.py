"""Writing a file whole or not at all: into a temporary file beside it, then renamed over it (``os.replace``, atomic
on one file system), so that a crash, a full disk or a reader at the wrong moment never meets half a report, export,
index or model description, and a failed write leaves the old file as it was."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path in ``path``'s folder for a writer that needs a file name (FAISS, safetensors). When the
    block ends normally the file is flushed to disk and replaces ``path``; when it raises, the file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text is encoded with ``encoding``) to ``path`` whole or not at all. Raises ``OSError``."""
    path = Path(path)
    with replacing(path) as tmp, tmp.open("xb") as fh:
        fh.write(data.encode(encoding) if isinstance(data, str) else data)
    return path

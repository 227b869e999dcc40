"""Small file helpers that work on a local folder and on a storage URI
(s3://, gs://, ...) alike, through pyarrow's file systems (as Ray does)."""
from __future__ import annotations

from pathlib import Path

from daae.atomic import atomic_write


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def exists(path: str) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    import pyarrow.fs

    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def read_text(path: str) -> str:
    if not is_remote(path):
        return Path(path).read_text()
    fs, inner = _fs(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def write_text(path: str, text: str) -> None:
    if not is_remote(path):
        # search.yaml is what --resume reads: never leave it half-written.
        atomic_write(path, lambda handle: handle.write(text), binary=False)
        return
    fs, inner = _fs(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as stream:
        stream.write(text.encode())


def names(folder: str, pattern: str) -> list[str]:
    """The names in ``folder`` that match the glob ``pattern``."""
    if not is_remote(folder):
        return sorted(p.name for p in Path(folder).glob(pattern))
    import fnmatch

    import pyarrow.fs

    fs, inner = _fs(folder)
    found = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted(name for info in found if fnmatch.fnmatch(name := info.path.rsplit("/", 1)[-1], pattern))


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    fs, inner = _fs(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def write_bytes(path: str, data: bytes) -> None:
    if not is_remote(path):
        atomic_write(path, lambda handle: handle.write(data))
        return
    fs, inner = _fs(path)
    with fs.open_output_stream(inner) as stream:
        stream.write(data)

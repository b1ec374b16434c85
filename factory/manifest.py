"""``manifest.json``: what made a run folder, so any record can be traced to its source.

It records the resolved config, the package and library versions, the model ids
and a sha256 of every input file. Each invocation rewrites it atomically; the
earlier invocations stay listed under ``history`` by time and config hash.
API keys never reach it: the config holds only the *name* of the key's variable.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import factory
from factory.atomic import write_atomic
from factory.config import RunConfig
from factory.records import file_sha256
from factory.store import StoreError


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "factory": factory.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_manifest(path: Path, cfg: RunConfig, backend: dict[str, Any], inputs: Iterable[Path]) -> dict[str, Any]:
    """Write the manifest at ``path`` (the run layout's ``manifest``), keeping earlier ones as history."""
    config = cfg.model_dump(mode="json")
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    history: list[dict[str, str]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            history = old.get("history", []) + [{"created": old["created"], "config_hash": old["config_hash"]}]
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable old manifest is replaced, not trusted
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash,
        "config": config,
        "versions": _versions(),
        "backend": backend,
        "inputs": {str(p): file_sha256(p) for p in sorted(set(inputs))},
        "history": history,
    }
    try:  # readers see the old manifest or the new one, never half of one
        write_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:  # a full disk, a read-only folder: the old manifest stays as it was
        raise StoreError(f"{path}: cannot write the run's manifest: {e.strerror or e}") from e
    return manifest

"""How varied a run's new instructions are, and how close they stay to the seed instructions.

Diversity of instructions uses a plain heuristic (after Self-Instruct's verb-noun analysis,
without its parser): the first word is the verb, and its object is the first later word that is
not a determiner, pronoun, preposition or conjunction (``STOP_WORDS``). Closeness to the seeds is
exact ROUGE-L F1, the measure the bootstrap filters with.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from factory.dedup import RougeIndex
from factory.records import file_sha256
from factory.report_rounds import RoundData
from factory.seeds import SeedError, load_seeds

STOP_WORDS = frozenset("""
    a an the this that these those some any each every all both either neither no my your his her its our their
    which what whose another such i me you he him she it we us they them myself yourself itself ourselves
    themselves someone something anyone anything everyone everything one about above across after against along
    among around at before behind below between by down during for from in inside into like near of off on onto
    out over through to toward towards under up upon with within without and or but so how why when where whether
    if than as
""".split())


def verb_object(instruction: str) -> tuple[str, str | None] | None:
    """The leading verb and its object by the heuristic of the module docstring."""
    words = re.findall(r"[a-z][a-z'-]*", instruction.lower())
    if not words:
        return None
    return words[0], next((w for w in words[1:] if w not in STOP_WORDS), None)


def made_from(rd: RoundData) -> list[Path]:
    """The folder the run was started from, when the run folder's path ends with output_dir/name."""
    out, name = rd.config.get("output_dir"), rd.config.get("name")
    if not out or not name or Path(out).is_absolute():
        return []
    tail = (Path(out) / name).parts
    parts = rd.folder.resolve().parts
    return [Path(*parts[: -len(tail)])] if parts[-len(tail):] == tail and len(parts) > len(tail) else []


def seed_instructions(rd: RoundData) -> tuple[list[str] | None, list[str]]:
    """The seed instructions of the run's bootstrap, and notes on any seed file that could not be used.

    Seed paths in the manifest are relative to the folder the run was made from: the current
    folder is tried first, then the one the run folder's own path implies.
    """
    if rd.manifest is None:
        return None, ["no readable manifest.json, so the seed files are unknown"]
    bases = list(dict.fromkeys([Path.cwd(), *made_from(rd)]))
    found, notes = [], []
    for name in rd.config.get("bootstrap", {}).get("seeds", []):
        path = next((b / name for b in bases if (b / name).is_file()), None)
        if path is None:
            notes.append(f"seed file {name} not found (looked in {', '.join(map(str, bases))})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the run warned about its seeds already
                found += [t.instruction for t in load_seeds(path)]
        except SeedError as e:
            notes.append(f"seed file {path} could not be read: {e}")
            continue
        recorded = rd.manifest.get("inputs", {}).get(str(name))
        if recorded and recorded != file_sha256(path):
            notes.append(f"seed file {path} has changed since the run (its sha256 differs from manifest.json)")
    return found or None, notes


def seed_similarity(new: list[str], seeds: list[str]) -> tuple[list[float], list[float]]:
    """For each new instruction: its highest and its mean exact ROUGE-L F1 against the seed instructions."""
    index = RougeIndex()
    for text in seeds:
        index.add(text)
    scored = [index.most_similar(text, k=1) for text in new]
    return [top[0][1] if top else 0.0 for top, _ in scored], [mean for _, mean in scored]

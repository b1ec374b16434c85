"""A run's data in the formats trainers and dataset hubs read: ``factory export``.

Every format is built from the run's records (``read_run``), never from other exports, and
written whole or not at all: into a hidden temporary path first, renamed into place at the end.
Records with ``parse_error`` or ``dropped`` set are left out and counted by file and reason.

Formats, and who reads them:

- ``hf`` / ``parquet`` / ``hub``: one table per kind of data the run has (``SOURCES``), each row
  with its ``round``: the splits of a ``datasets.DatasetDict`` saved with ``save_to_disk``, one
  Parquet file each, or one config each (split ``train``) pushed with ``push_to_hub``.
- ``trl-sft``: ``{"messages": [...]}``, TRL's conversational language-modelling type (SFTTrainer).
- ``trl-pairs``: TRL's preference type, standard or conversational (``factory.preferences.FORMATS``).
- ``openrlhf-rm`` / ``openrlhf-ppo``: the keys OpenRLHF's ``train_rm`` and ``train_ppo`` read
  with their default arguments (see ``openrlhf_rm_rows`` and ``openrlhf_ppo_rows``).
- ``alpaca``: Self-Instruct / Alpaca ``{"instruction", "input", "output"}``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from factory.preferences import FORMATS as TRL_PAIR_FORMATS
from factory.preferences import prompt_text, write_jsonl
from factory.records import ChatExample, Instruction, Preference, PreferencePair, Record, Task
from factory.records import Reranked
from factory.store import read_jsonl

EXPORT_FORMATS = ("hf", "parquet", "hub", "trl-sft", "trl-pairs", "openrlhf-rm", "openrlhf-ppo", "alpaca")
STYLED = ("trl-pairs", "openrlhf-rm")
"""formats with a standard (text) and a conversational (chat messages) form"""


class ExportError(ValueError):
    """An export that cannot be made as asked: the message names the run, file or option."""


# -- reading a run ------------------------------------------------------------------------------

SOURCES: dict[str, tuple[str, type[Record]]] = {
    "instructions": ("instructions.jsonl", Instruction),
    "tasks": ("tasks.jsonl", Task),
    "sft": ("sft.jsonl", ChatExample),
    "critique_pairs": ("critique_pairs.jsonl", PreferencePair),
    "preferences": ("preferences.jsonl", Preference),
    "rerank": ("rerank.jsonl", Reranked),
}
"""what an export reads, by the name of its split"""

PROTECTED = {file for file, _ in SOURCES.values()} | {
    "manifest.json", "generations.jsonl", "bootstrap_requests.jsonl", "revisions.jsonl", "judgments.jsonl",
    "judge_samples.jsonl",
    "sft", "rm", "policy"}
"""names in a run (or round) folder that an export must never replace, even with --force"""


@dataclass
class Records:
    """The usable records of one file over the chosen rounds, each with its round number."""

    file: str
    records: list[tuple[int, Record]] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)
    """(file, reason) -> count"""


@dataclass
class Run:
    path: Path
    rounds: list[tuple[int, Path]]
    """(round number, folder) of the rounds read"""
    multi_round: bool
    data: dict[str, Records]


def run_rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """(number, folder) of a run's rounds: round-1, round-2, ... or the run folder itself as round 1."""
    from factory.pipeline import round_dirs

    dirs = round_dirs(run_dir)
    if dirs == [Path(run_dir)]:
        return [(1, Path(run_dir))]
    return [(int(d.name[len("round-"):]), d) for d in dirs]


def read_run(run_dir: Path, round_number: int | None = None) -> Run:
    """Every exportable record of the run (or of one round), left-out records counted by reason."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder (expected e.g. outputs/<name>)")
    rounds = run_rounds(run_dir)
    multi = len(rounds) > 1 or rounds[0][1] != run_dir
    if round_number is not None:
        picked = [(n, d) for n, d in rounds if n == round_number]
        if not picked:
            have = ", ".join(str(n) for n, _ in rounds)
            raise ExportError(f"{run_dir}: no round {round_number}; its rounds are {have}")
        rounds = picked
    data = {}
    for name, (file, model) in SOURCES.items():
        got = Records(file)
        seen: set[str] = set()
        for n, folder in rounds:
            for rec in read_jsonl(folder / file, model):
                # Rounds >= 2 hold a copy of round 1's tasks: the same records, kept once (with round 1).
                if rec.key in seen:
                    continue
                seen.add(rec.key)
                if rec.parse_error is not None:
                    got.left_out[file, "parse_error"] += 1
                elif getattr(rec, "dropped", None):
                    got.left_out[file, f"dropped ({rec.dropped})"] += 1
                else:
                    got.records.append((n, rec))
        data[name] = got
    return Run(run_dir, rounds, multi, data)


# -- tables: the rows of one output, and where they came from -----------------------------------


@dataclass
class Table:
    name: str
    rows: list[dict]
    sources: list[str]
    left_out: Counter


def _table(name: str, run: Run, sources: list[str], rows: list[dict], extra_left_out: Counter | None = None) -> Table:
    left = Counter()
    for s in sources:
        left += run.data[s].left_out
    return Table(name, rows, [run.data[s].file for s in sources], left + (extra_left_out or Counter()))


def _task_prompt(t: Task) -> str:
    # The prompt factory's own stages make of a task (critique.load_prompts): instruction, then its first input.
    first = t.instances[0].input if t.instances else ""
    return f"{t.instruction}\n\n{first}" if first else t.instruction


def trl_sft_rows(run: Run) -> Table:
    """TRL's conversational language-modelling type: ``{"messages": [...]}``, nothing else."""
    return _table("trl-sft", run, ["sft"], [{"messages": r.messages} for _, r in run.data["sft"].records])


def trl_pairs_rows(run: Run, style: str) -> Table:
    prefs = [r for _, r in run.data["preferences"].records]
    return _table("trl-pairs", run, ["preferences"], TRL_PAIR_FORMATS[style](prefs))


def openrlhf_rm_rows(run: Run, style: str) -> Table:
    """Rows for OpenRLHF's reward-model trainer with its default keys.

    Checked against OpenRLHF's source (github.com/OpenRLHF/OpenRLHF): openrlhf/cli/train_rm.py
    defaults ``--prompt_key None``, ``--chosen_key chosen``, ``--rejected_key rejected``, and
    openrlhf/datasets/reward_dataset.py (``preprocess_data``), with no prompt key, reads each of
    ``chosen`` and ``rejected`` as the whole conversation: chat messages passed through the
    tokenizer's chat template under ``--apply_chat_template`` (conversational), else plain text
    (standard; here the Human/Assistant transcript). It also reads an optional ``margin``, used
    only under ``--margin_loss``: ours is the judge's p_chosen - (1 - p_chosen). Other keys are
    dropped by its ``dataset.map(remove_columns=...)``, but none are written.
    """
    rows = []
    for _, p in run.data["preferences"].records:
        chosen = p.messages + [{"role": "assistant", "content": p.chosen}]
        rejected = p.messages + [{"role": "assistant", "content": p.rejected}]
        if style == "standard":
            chosen, rejected = prompt_text(chosen), prompt_text(rejected)
        rows.append({"chosen": chosen, "rejected": rejected, "margin": p.margin})
    return _table("openrlhf-rm", run, ["preferences"], rows)


def openrlhf_ppo_rows(run: Run) -> Table:
    """Prompts for OpenRLHF's PPO trainers with their default key: ``{"input": str}``.

    openrlhf/cli/train_ppo.py and train_ppo_ray.py default ``--input_key input``;
    openrlhf/datasets/prompts_dataset.py reads it as text (formatted with ``--input_template``),
    or, under ``--apply_chat_template``, wraps a string in one user turn. A string therefore
    works either way. The prompts are the run's tasks, as for factory's own PPO.
    """
    rows = [{"input": _task_prompt(t)} for _, t in run.data["tasks"].records]
    return _table("openrlhf-ppo", run, ["tasks"], rows)


def alpaca_rows(run: Run) -> Table:
    """Self-Instruct / Alpaca rows: one per task instance, then one per single-turn SFT example."""
    rows = [{"instruction": t.instruction, "input": i.input, "output": i.output}
            for _, t in run.data["tasks"].records for i in t.instances]
    multi_turn = Counter()
    for _, ex in run.data["sft"].records:
        m = ex.messages
        if [x["role"] for x in m] == ["user", "assistant"]:
            rows.append({"instruction": m[0]["content"], "input": "", "output": m[1]["content"]})
        else:  # a system prompt or several turns have no place in (instruction, input, output)
            multi_turn["sft.jsonl", "not single-turn"] += 1
    return _table("alpaca", run, ["tasks", "sft"], rows, multi_turn)


# -- Hugging Face datasets: one split per kind of data -------------------------------------------


def _features(split: str):
    """The columns of a split, typed: a stable schema, even where a column is all nulls or empty lists."""
    from datasets import Features, Value

    s, f, i, b = Value("string"), Value("float64"), Value("int64"), Value("bool")
    messages = [{"role": s, "content": s}]
    columns = {
        "instructions": {"instruction": s, "avg_similarity": f, "model": s},
        "tasks": {"task": s, "instruction": s, "input": s, "output": s, "is_classification": b,
                  "p_classification": f, "model": s},
        "sft": {"messages": messages, "constitution": s, "principles": [s], "source": s},
        "critique_pairs": {"prompt": s, "chosen": s, "rejected": s, "source": s},
        "preferences": {"prompt": s, "messages": messages, "chosen": s, "rejected": s, "p_chosen": f, "margin": f,
                        "principles": [s], "judge_model": s, "p_orders": [f], "consistent": b,
                        "low_confidence": b, "source": s},
        "rerank": {"prompt": s, "messages": messages, "responses": [s], "scores": [f], "chosen": i,
                   "reward_model": s, "model": s, "source": s},
    }[split]
    keyed = {} if split == "tasks" else {"key": s}  # a task row is one instance; its task's key is "task"
    return Features({"round": i, **keyed, **columns})


def split_tables(run: Run) -> list[tuple[Table, object]]:
    """(table, datasets.Features) of every split the run has rows for, in pipeline order."""
    out = []
    for split in SOURCES:
        features = _features(split)
        got = run.data[split]
        if split == "tasks":
            rows = [{"round": n, "task": t.key, "instruction": t.instruction, "input": x.input, "output": x.output,
                     "is_classification": t.is_classification, "p_classification": t.p_classification,
                     "model": t.model} for n, t in got.records for x in t.instances]
        else:
            rows = [{"round": n, **rec.model_dump(include=set(features) - {"round"})} for n, rec in got.records]
        if rows:
            out.append((_table(split, run, [split], rows), features))
    return out


def dataset(table: Table, features):
    from datasets import Dataset

    return Dataset.from_list(table.rows, features=features)


def dataset_dict(tables: list[tuple[Table, object]]):
    from datasets import DatasetDict

    return DatasetDict({t.name: dataset(t, feats) for t, feats in tables})


# -- writing -------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def output_root(run_dir: Path) -> Path:
    """The folder that holds the run (its config's ``output_dir``), symlinks followed: exports stay in it."""
    return Path(os.path.abspath(run_dir)).parent.resolve()


def check_destination(output: Path, run_dir: Path) -> None:
    """Refuse an output path that leaves the output folder holding the run: ``..``, an absolute
    path elsewhere, or a symlink inside it that points outside (``resolve`` follows every link)."""
    if "\x00" in str(output):
        raise ExportError(f"{str(output)!r}: a path with a NUL byte; choose another output")
    root = output_root(run_dir)
    out = output.resolve()
    if not out.is_relative_to(root):
        raise ExportError(f"{output} resolves to {out}, outside the output folder {root} that holds the run; "
                          f"exports are written inside it (e.g. -o {root / 'exports' / output.name})")


def check_output(output: Path, run: Run, force: bool) -> None:
    """Refuse an output outside the output folder, one that exists (without --force), or one that
    would replace part of the run."""
    check_destination(output, run.path)
    out = output.resolve()
    for _, folder in run_rounds(run.path) + [(0, run.path)]:  # every round, not only those exported
        folder = folder.resolve()
        if out == folder or out in folder.parents:
            raise ExportError(f"{output}: this would replace the run folder {folder}; choose another output")
        if out.parent == folder and out.name in PROTECTED:
            raise ExportError(f"{output} is the run's own {out.name}; choose another output")
    if output.exists() and not force:
        raise ExportError(f"{output} exists; pass --force to overwrite it")


@contextmanager
def replacing(output: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``output``; once the block succeeds, it becomes ``output``.

    A failed export leaves ``output`` as it was (and no temporary behind). A folder cannot be
    renamed over another, so an existing output is moved aside first and removed last.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    old = output.with_name(f".{output.name}.{os.getpid()}.old")
    _remove(tmp)
    try:
        yield tmp
        if output.exists() or output.is_symlink():
            os.replace(output, old)
            try:
                os.replace(tmp, output)
            except OSError:
                os.replace(old, output)
                raise
            _remove(old)
        else:
            os.replace(tmp, output)
    finally:
        _remove(tmp)


def _rounds_note(run: Run) -> str:
    if not run.multi_round:
        return ""
    ns = [n for n, _ in run.rounds]
    return f", round {ns[0]}" if len(ns) == 1 else f", rounds {', '.join(map(str, ns))}"


def summary(where: str, table: Table, run: Run) -> str:
    line = f"{where}: {len(table.rows)} rows from {' + '.join(table.sources)}{_rounds_note(run)}"
    if table.left_out:
        line += "; left out " + ", ".join(f"{n} {why} in {file}" for (file, why), n in sorted(table.left_out.items()))
    return line


def _nothing(run: Run, fmt: str, table: Table) -> ExportError:
    return ExportError(f"{run.path}: nothing to export as {fmt}: no usable records in {' or '.join(table.sources)}"
                       + (f" ({sum(table.left_out.values())} left out)" if table.left_out else ""))


def hub_token() -> str | None:
    """The Hugging Face token: HF_TOKEN, else huggingface_hub's stored login (``hf auth login``)."""
    from huggingface_hub import get_token

    return get_token()


def export_run(run_dir: Path, fmt: str, output: Path | None = None, *, style: str | None = None,
               round_number: int | None = None, force: bool = False, repo: str | None = None,
               private: bool = False, echo: Callable[[str], None] = print) -> None:
    """Export the run at ``run_dir`` as ``fmt``; ``echo`` gets one summary line per file written."""
    if round_number is not None and (type(round_number) is not int or round_number < 1):
        raise ExportError(f"--round: expected a positive whole number, got {round_number!r}")
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if style is not None and fmt not in STYLED:
        raise ExportError(f"--style applies to {' and '.join(STYLED)}, not to {fmt}")
    if fmt == "hub":
        if repo is None:
            raise ExportError("hub: pass --repo OWNER/NAME, the dataset repository to push to")
        if output is not None:
            raise ExportError("hub: pushes to --repo and writes no local file; leave out -o")
    else:
        if output is None:
            raise ExportError(f"{fmt}: pass -o/--output, the path to write")
        if repo is not None or private:
            raise ExportError("--repo and --private apply to --format hub only")
    run = read_run(run_dir, round_number)
    style = style or "conversational"

    if fmt in ("hf", "parquet", "hub"):
        tables = split_tables(run)
        if not tables:
            raise ExportError(f"{run.path}: nothing to export: no usable records in "
                              f"{', '.join(file for file, _ in SOURCES.values())}")
        if fmt == "hub":
            _push(run, tables, repo, private, echo)
            return
        check_output(output, run, force)
        with replacing(output) as tmp:
            if fmt == "hf":
                dataset_dict(tables).save_to_disk(str(tmp))
            else:
                tmp.mkdir()
                for (t, feats) in tables:
                    dataset(t, feats).to_parquet(str(tmp / f"{t.name}.parquet"))
        for t, _ in tables:
            where = f"{output} (split {t.name})" if fmt == "hf" else str(output / f"{t.name}.parquet")
            echo(summary(where, t, run))
        return

    table = {"trl-sft": lambda: trl_sft_rows(run), "trl-pairs": lambda: trl_pairs_rows(run, style),
             "openrlhf-rm": lambda: openrlhf_rm_rows(run, style), "openrlhf-ppo": lambda: openrlhf_ppo_rows(run),
             "alpaca": lambda: alpaca_rows(run)}[fmt]()
    if not table.rows:
        raise _nothing(run, fmt, table)
    check_output(output, run, force)
    with replacing(output) as tmp:
        if fmt == "alpaca" and output.suffix == ".json":
            # alpaca_data.json, as Stanford Alpaca ships it, is one JSON array
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(table.rows, f, ensure_ascii=False, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            write_jsonl(tmp, table.rows)
    echo(summary(str(output), table, run))


def _push(run: Run, tables: list[tuple[Table, object]], repo: str, private: bool, echo) -> None:
    token = hub_token()
    if not token:
        raise ExportError("hub: no Hugging Face token; set HF_TOKEN or log in with `hf auth login`, "
                          "then export again")
    pushed: list[str] = []
    # One config per kind of data, each with a "train" split: a config has one schema (a DatasetDict
    # of differently shaped splits would not load back from the Hub), and load_dataset(repo, "sft")
    # is how the Hub serves several tables.
    for t, feats in tables:
        try:
            dataset(t, feats).push_to_hub(repo, config_name=t.name, split="train", private=private or None,
                                          token=token)
        except Exception as e:
            # Network, authentication and repository errors arrive as many types from several libraries
            # (httpx, huggingface_hub, datasets); all are the user's to fix, none needs a traceback.
            # The token is scrubbed in case a message ever quotes a request's headers.
            done = f" (already pushed: {', '.join(pushed)})" if pushed else ""
            raise ExportError(f"hub: pushing {t.name} to {repo} failed{done}: {type(e).__name__}: "
                              f"{str(e).replace(token, '***')}") from None
        pushed.append(t.name)
        echo(summary(f"pushed {repo} (config {t.name}, split train)", t, run))

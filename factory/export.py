"""A run's data in the formats trainers and dataset hubs read: ``factory export``.

Every format is built from the run's records (``factory.export_records.read_run``), never from
other exports, and written whole or not at all: into a hidden temporary path first, renamed into
place at the end (``factory.export_output``). Records with ``parse_error`` or ``dropped`` set are
left out and counted by file and reason.

Formats, and who reads them:

- ``hf`` / ``parquet`` / ``hub``: one table per kind of data the run has (``SOURCES``), each row
  with its ``round``: the splits of a ``datasets.DatasetDict`` saved with ``save_to_disk``, one
  Parquet file each, or one config each (split ``train``) pushed with ``push_to_hub``
  (``factory.export_datasets``).
- ``trl-sft``: ``{"messages": [...]}``, TRL's conversational language-modelling type (SFTTrainer).
- ``trl-pairs``: TRL's preference type, standard or conversational (``factory.preferences.FORMATS``).
- ``openrlhf-rm`` / ``openrlhf-ppo``: the keys OpenRLHF's ``train_rm`` and ``train_ppo`` read
  with their default arguments (see ``factory.export_formats``).
- ``alpaca``: Self-Instruct / Alpaca ``{"instruction", "input", "output"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from factory.atomic import atomic_file
from factory.export_datasets import dataset, dataset_dict, push, split_tables
from factory.export_formats import ROWS, Table, summary
from factory.export_output import check_output, replacing
from factory.export_records import SOURCES, ExportError, Run, read_run, source_path
from factory.layout import RunLayout
from factory.preferences import write_jsonl

__all__ = ["EXPORT_FORMATS", "STYLED", "ExportError", "export_run"]

EXPORT_FORMATS = ("hf", "parquet", "hub", "trl-sft", "trl-pairs", "openrlhf-rm", "openrlhf-ppo", "alpaca")
STYLED = ("trl-pairs", "openrlhf-rm")
"""formats with a standard (text) and a conversational (chat messages) form"""


def _nothing(run: Run, fmt: str, table: Table) -> ExportError:
    return ExportError(f"{run.path}: nothing to export as {fmt}: no usable records in {' or '.join(table.sources)}"
                       + (f" ({sum(table.left_out.values())} left out)" if table.left_out else ""))


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
            files = (source_path(RunLayout(run.path), split).name for split in SOURCES)
            raise ExportError(f"{run.path}: nothing to export: no usable records in {', '.join(files)}")
        if fmt == "hub":
            push(run, tables, repo, private, echo)
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

    table = ROWS[fmt](run, style)
    if not table.rows:
        raise _nothing(run, fmt, table)
    check_output(output, run, force)
    with replacing(output) as tmp:
        if fmt == "alpaca" and output.suffix == ".json":
            # alpaca_data.json, as Stanford Alpaca ships it, is one JSON array
            with atomic_file(tmp) as f:
                json.dump(table.rows, f, ensure_ascii=False, indent=2)
                f.write("\n")
        else:
            write_jsonl(tmp, table.rows)
    echo(summary(str(output), table, run))

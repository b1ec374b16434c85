"""``factory principles check|import`` and ``factory pairs import|export``: principle files and
preference pairs, in and out."""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.common import UserError, user_errors


@click.group()
def principles():
    """Check and import principle files (constitutions)."""


@principles.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def principles_check(files):
    """Validate principle FILES (YAML or JSON) and print a summary of each.

    Errors name the file, the line or key, and what was expected; exit code 2.
    """
    from factory.constitution import check_summary, load_constitution

    for path in files:
        click.echo(check_summary(load_constitution(path), path))


@principles.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="YAML file to write.")
@click.option("--name", help="Name of the new constitution (default: from the file name).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@user_errors
def principles_import(file, output, name, force):
    """Convert a constitution in a public format into a principle file.

    Recognised shapes (JSON): {"constitutions": [{"critic", "revision"}], "system_chat": [...]};
    {id: {"prompt": ["CritiqueRequest: ... Critique:"], "edit_request": "RevisionRequest: ... Revision:"}};
    a list of judge-question strings.
    """
    from factory.constitution import load_constitution, to_yaml
    from factory.constitution_import import import_constitution

    if output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    constitution = import_constitution(file, name=name)
    tmp = output.with_name(f".{output.stem}.tmp.yaml")
    try:
        tmp.write_text(to_yaml(constitution), encoding="utf-8")
        load_constitution(tmp)  # what we write must load back, or nothing is written
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    click.echo(f"wrote {output}: {len(constitution.principles)} principles, {len(constitution.examples)} examples")


@click.group()
def pairs():
    """Import human preference pairs and export pairs for TRL and the Hugging Face ecosystem."""


@pairs.command("import")
@click.argument("kind", type=click.Choice(["hh", "votes"]))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file of Preference records to write.")
@click.option("--min-gap", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="votes: the least score difference that makes a pair.")
@click.option("--skip-bad", is_flag=True, help="Leave out malformed lines (counted by reason) instead of stopping.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@user_errors
def pairs_import(kind, file, output, min_gap, skip_bad, force):
    """Convert human preference data in FILE into Preference records, like the judge's.

    \b
    hh:    Anthropic HH-RLHF, one {"chosen": ..., "rejected": ...} per line, each a
           "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue; the two must differ only in
           the last Assistant turn. Labels are certain: p_chosen = 1.
    votes: one {"prompt": ..., "answers": [{"text": ..., "score": ...}, ...]} per line,
           e.g. Stack Exchange answers with their vote scores. Every two answers whose
           scores a > b differ by at least --min-gap make a pair with the soft label
           p_chosen = sigmoid(f(a) - f(b)), f(s) = sign(s) * log2(1 + |s|): the log
           makes 10 votes vs 0 count for more than 1000 vs 900.

    A malformed line stops the import with FILE:LINE and what was expected, and
    nothing is written; with --skip-bad it is left out and counted instead.
    """
    from factory.preferences import import_hh, import_votes, write_jsonl

    if output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    if kind == "hh":
        records, skipped = import_hh(file, skip_bad=skip_bad)
    else:
        records, skipped = import_votes(file, min_gap=min_gap, skip_bad=skip_bad)
    write_jsonl(output, [rec.model_dump(mode="json") for rec in records])
    click.echo(f"wrote {output}: {len(records)} pairs from {file}")
    for reason, n in sorted(skipped.items()):
        click.echo(f"  skipped {n} {reason}")


@pairs.command("export")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["standard", "conversational"]), default="standard",
              show_default=True, help="TRL preference format to write.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSONL file to write.")
@click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Keep only pairs whose p_chosen is at least this.")
@click.option("--drop-flagged", is_flag=True, help="Leave out pairs the judge flagged as low-confidence.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@user_errors
def pairs_export(file, fmt, output, min_p, drop_flagged, force):
    """Write the Preference records in FILE (preferences.jsonl, or `pairs import` output) for TRL.

    \b
    standard:       {"prompt": str, "chosen": str, "rejected": str}; a multi-turn
                    prompt becomes a "Human: ...\\n\\nAssistant: ..." transcript.
    conversational: {"prompt": [messages], "chosen": [{"role": "assistant", ...}],
                    "rejected": [...]}, for trainers that apply the chat template.

    Both load with datasets.load_dataset("json", data_files=OUTPUT) and feed
    TRL's RewardTrainer and DPOTrainer as they are.
    """
    from factory.preferences import FORMATS, write_jsonl
    from factory.records import Preference
    from factory.store import read_jsonl

    if output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    records = read_jsonl(file, Preference)
    kept = [r for r in records if r.p_chosen >= min_p and not (drop_flagged and r.low_confidence)]
    write_jsonl(output, FORMATS[fmt](kept))
    click.echo(f"wrote {output}: {len(kept)} pairs ({fmt}) from {file}, {len(records) - len(kept)} left out")

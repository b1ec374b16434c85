"""``factory export``, ``report``, ``config`` and ``prepare``: what a run made, for elsewhere, and
the set-up helpers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from factory.cli.common import UserError, backend_opt, load_run_config, name_opt, set_opt, user_errors


def _plain_round(value: str | None) -> int | None:
    """--round as written: digits only, no sign, spaces or underscores that int() would let through."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise click.BadParameter(f"expected a positive whole number, got {value!r}")
    return int(value)


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", required=True,
              type=click.Choice(["hf", "parquet", "hub", "trl-sft", "trl-pairs", "openrlhf-rm", "openrlhf-ppo",
                                 "alpaca"]), help="What to write (see above).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File or folder to write (all formats but hub).")
@click.option("--style", type=click.Choice(["standard", "conversational"]),
              help="trl-pairs and openrlhf-rm: text, or chat messages (the default).")
@click.option("--round", "round_number", callback=lambda _c, _p, v: _plain_round(v), metavar="N",
              help="Export this round only (default: all).")
@click.option("--repo", metavar="OWNER/NAME", help="hub: the dataset repository to push to.")
@click.option("--private", is_flag=True, help="hub: create the repository private.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@user_errors
def export(run, fmt, output, style, round_number, repo, private, force):
    """Export the data of RUN (a run folder, e.g. outputs/demo) for training elsewhere.

    \b
    hf            datasets.DatasetDict.save_to_disk folder, one split per kind of data
                  the run has: instructions, tasks (one row per instance), sft,
                  critique_pairs, preferences, rerank; every row has its round.
    parquet       the same splits as OUTPUT/<split>.parquet.
    hub           the same tables pushed to --repo, one config each (split train):
                  load_dataset(REPO, "sft"); the token comes from HF_TOKEN or
                  `hf auth login`.
    trl-sft       JSONL {"messages": [...]} for TRL's SFTTrainer.
    trl-pairs     JSONL preference pairs for TRL's RewardTrainer / DPOTrainer.
    openrlhf-rm   JSONL {"chosen", "rejected", "margin"} for openrlhf.cli.train_rm with its
                  default keys; conversational needs --apply_chat_template there.
    openrlhf-ppo  JSONL {"input": prompt} for openrlhf.cli.train_ppo(_ray) with its
                  default key (the run's tasks); add --apply_chat_template for chat models.
    alpaca        {"instruction", "input", "output"}: every task instance, then every
                  single-turn SFT example; a JSON array if OUTPUT ends in .json, else JSONL.

    Records with a parse_error or dropped are left out and counted. All rounds of a
    multi-round run are exported together unless --round picks one. Nothing is written
    unless the whole export succeeds.
    """
    from factory.export import ExportError, export_run

    try:
        export_run(run, fmt, output, style=style, round_number=round_number, force=force, repo=repo,
                   private=private, echo=click.echo)
    except ExportError as e:
        raise UserError(str(e)) from None


@click.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the report into (default: RUN/report).")
@user_errors
def report(run, output):
    """Write a report of RUN (a run folder, e.g. outputs/demo): one self-contained index.html
    with the figures embedded, and each figure beside it as a PNG; prints the page's path.

    It shows counts per stage and rejections by reason, instruction lengths, ROUGE-L
    similarity of the new instructions to the seeds, leading verbs and their objects,
    principle usage, critique rounds, the judge's soft labels and position-flip rate,
    reward-model accuracy per epoch, PPO reward, KL and entropy, and a few records of
    each stage. Stages that did not run are listed as such; a multi-round run also gets
    its rounds compared.
    """
    from factory.report import build_report

    click.echo(str(build_report(run, output)))


@click.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@set_opt
@backend_opt
@name_opt
@click.option("--reference", is_flag=True, help="Print every key with its default and description, as commented "
              "TOML (configs/reference.toml), instead.")
@user_errors
def config(config, overrides, backend, name, reference):
    """Validate CONFIG and print it resolved, with every default filled in, as JSON."""
    if reference:
        from factory.config_reference import reference_toml

        click.echo(reference_toml(), nl=False)
        return
    if config is None:
        raise UserError("give a CONFIG file to check, or --reference for every key")
    cfg = load_run_config(config, overrides, backend, name)
    click.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@click.command()
@user_errors
def prepare():
    """Convert the embedded model (SmolLM2-135M-Instruct) once into the cache; print its folder.

    The cache is $FACTORY_CACHE, else ~/.cache/factory. Later loads take about a second.
    """
    from factory.llm.embedded import embedded_model_dir

    click.echo(str(embedded_model_dir()))

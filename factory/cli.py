"""The ``factory`` command: one thin command per stage, plus run and setup helpers.

User errors (bad config, missing file, unreachable server) exit with code 2 and a
one-paragraph message naming the file, key or server; never a traceback.
"""

from __future__ import annotations

import json
from functools import wraps
from pathlib import Path

import click

from factory import __version__
from factory.config import ConfigError, RunConfig, load_config


class UserError(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Turn the errors a user can fix into a clean message and exit code 2."""
    from factory.constitution import ConstitutionError
    from factory.llm.base import BackendError
    from factory.seeds import SeedError
    from factory.store import StoreError

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, SeedError, StoreError, BackendError, ConstitutionError, FileNotFoundError) as e:
            raise UserError(str(e)) from None

    return wrapper


config_arg = click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
set_opt = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set generate.limit=4 (repeatable; VALUE is read as YAML).",
)
backend_opt = click.option(
    "--backend",
    metavar="SPEC",
    help="Model backend, overriding backend.spec: hf:embedded, hf:/path, openai:URL#model, vllm:model.",
)
name_opt = click.option("--name", metavar="RUN", help="Run folder name under output_dir (overrides name).")


def _load(config: Path | None, overrides: tuple[str, ...], backend: str | None, name: str | None = None) -> RunConfig:
    extra = list(overrides)
    if backend:
        extra.append(f"backend.spec={json.dumps(backend)}")
    if name:
        extra.append(f"name={json.dumps(name)}")
    return load_config(config, extra)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="factory")
def cli():
    """Turn seed tasks and principle files into instruction data, preference pairs
    and a trained model, with no human labels.

    Every stage reads and writes JSONL in one run folder, outputs/<run>/, and can be
    killed and restarted at any point without losing or repeating work. Start with
    `factory run configs/demo.toml`.
    """


@cli.command()
@config_arg
@set_opt
@backend_opt
@name_opt
@click.option("--show", default=3, show_default=True, help="Print this many records of the last stage at the end.")
@user_errors
def run(config, overrides, backend, name, show):
    """Run the stages CONFIG names (TOML or YAML), in order, in one run folder.

    Rerunning a finished or interrupted run does only the missing work.
    """
    from factory.pipeline import run_stages

    cfg = _load(config, overrides, backend, name)
    run_stages(cfg, echo=click.echo)
    if show:
        _show_samples(cfg, show)
    click.echo(f"run folder: {cfg.run_dir}")


def stage_command(stage: str, doc: str):
    """A thin command that runs one stage with the settings of --config (defaults without one)."""

    @click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), help="Run config (TOML or YAML).")
    @set_opt
    @backend_opt
    @name_opt
    @user_errors
    def command(config, overrides, backend, name):
        from factory.pipeline import run_stages

        cfg = _load(config, overrides, backend, name).model_copy(update={"stages": [stage]})
        run_stages(cfg, echo=click.echo)

    command.__doc__ = doc
    return cli.command(name=stage)(command)


stage_command(
    "generate",
    """Answer seed-task instructions with the model; writes generations.jsonl.

    Settings come from the [generate] table of --config (defaults without one).
    """,
)
stage_command(
    "bootstrap",
    """Grow new instructions from the seed tasks (Self-Instruct); writes instructions.jsonl.

    Each request shows the model a numbered list of pool instructions (seeds and
    machine-made ones) and lets it continue the list. Candidates are filtered by
    length, blacklisted words and bad starts, then by ROUGE-L similarity to every
    pool instruction; survivors join the pool. Stops at [bootstrap] target.
    Every request and every candidate's verdict is kept in bootstrap_requests.jsonl.
    """,
)
stage_command(
    "instances",
    """Write inputs and outputs for each new instruction; writes tasks.jsonl.

    Decides per instruction whether it is a classification task (the probability
    of Yes over No), then writes instances output-first for classification tasks
    and input-first for the rest, and filters them. Settings: [instances].
    """,
)
stage_command(
    "critique",
    """Answer each prompt, critique the answer under a principle, revise it; writes
    revisions.jsonl and sft.jsonl.

    A principle is drawn by weight from [critique] constitution for each of the
    [critique] rounds; the constitution's examples go in front as chat turns. Prompts
    come from [critique] prompts (a JSONL of {"prompt": ...}, e.g.
    seeds/red_team_prompts.jsonl) or, without it, from the run's tasks.jsonl.
    """,
)


@cli.group()
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
    tmp.write_text(to_yaml(constitution), encoding="utf-8")
    load_constitution(tmp)  # what we write must load back, or nothing is written
    tmp.replace(output)
    click.echo(f"wrote {output}: {len(constitution.principles)} principles, {len(constitution.examples)} examples")


@cli.command()
@config_arg
@set_opt
@backend_opt
@name_opt
@user_errors
def config(config, overrides, backend, name):
    """Validate CONFIG and print it resolved, with every default filled in, as JSON."""
    cfg = _load(config, overrides, backend, name)
    click.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@cli.command()
@user_errors
def prepare():
    """Convert the embedded model (SmolLM2-135M-Instruct) once into the cache; print its folder.

    The cache is $FACTORY_CACHE, else ~/.cache/factory. Later loads take about a second.
    """
    from factory.llm.embedded import embedded_model_dir

    click.echo(str(embedded_model_dir()))


def _show_samples(cfg: RunConfig, count: int) -> None:
    """A few records of the last stage that ran, so a run ends by showing what it made."""
    from factory.records import Generation, Instruction, Revision, Task
    from factory.store import read_jsonl

    last = cfg.stages[-1]
    files = {"generate": ("generations.jsonl", Generation), "bootstrap": ("instructions.jsonl", Instruction),
             "instances": ("tasks.jsonl", Task), "critique": ("revisions.jsonl", Revision)}
    name, record_type = files[last]
    path = cfg.run_dir / name
    if not path.is_file():
        return
    records = read_jsonl(path, record_type)
    if last == "instances":  # tasks with instances are the interesting ones
        records = [t for t in records if t.instances] or records
    for rec in records[:count]:
        click.echo("")
        if isinstance(rec, Generation):
            click.secho(f"[{rec.task_id}] {rec.messages[-1]['content']}", bold=True)
            click.echo(rec.text)
        elif isinstance(rec, Revision):
            click.secho(rec.prompt, bold=True)
            click.echo(f"  first answer: {rec.initial}")
            for rd in rec.rounds:
                click.echo(f"  critique under '{rd.principle_id}': {rd.critique}")
            click.echo(f"  final revision: {rec.final}")
        elif isinstance(rec, Instruction):
            click.secho(rec.instruction, bold=True)
            click.echo(f"  closest pool instruction ({rec.most_similar[0].score:.2f}): {rec.most_similar[0].instruction}")
        else:
            kind = "classification" if rec.is_classification else "generation"
            click.secho(f"{rec.instruction}  [{kind}, p={rec.p_classification:.2f}]", bold=True)
            for inst in rec.instances[:2]:
                click.echo(f"  input:  {inst.input or '(none)'}\n  output: {inst.output}")
    click.echo("")


def main():
    cli(prog_name="factory")

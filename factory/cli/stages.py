"""``factory run`` and one command per data stage; each is a call into ``factory.pipeline.run_stages``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from factory.cli.common import (
    UserError,
    backend_opt,
    check_failures,
    config_arg,
    config_opt,
    load_run_config,
    name_opt,
    pickle_opt,
    remote_code_opt,
    set_opt,
    user_errors,
)
from factory.config import RunConfig


@click.command()
@config_arg
@set_opt
@backend_opt
@name_opt
@pickle_opt
@remote_code_opt
@click.option("--rounds", type=click.IntRange(min=1), help="RLAIF rounds (overrides rounds): after PPO, the "
              "trained policy answers the next round's prompts; each round in RUN/round-N/.")
@click.option("--show", default=3, show_default=True, help="Print this many records of the last data stage at the end.")
@click.option("--report/--no-report", "make_report", default=True, show_default=True,
              help="Write the run's report (RUN/report/index.html, as `factory report`) at the end.")
@user_errors
def run(config, overrides, backend, name, allow_pickle, trust_remote_code, rounds, show, make_report):
    """Run the stages CONFIG names (TOML or YAML), in order, in one run folder.

    The whole loop is bootstrap -> instances -> critique -> judge -> rm -> ppo (or sft -> dpo),
    and heldout then measures the trained models on prompts no stage trained on; a config
    names the stages it wants in its `stages` list. Rerunning a finished or interrupted
    run does only the missing work.

    Exit code 0: done; 2: a user error (bad input, wrong key or URL), named in the message;
    3: done, but the model server failed for good on some items (logged in failures.jsonl):
    run the same command again to retry only those.
    """
    from factory.pipeline import round_config, run_stages

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("factory run is one process: every process would run and write the data stages. Launch "
                        "only the trainers with several processes (accelerate launch ... factory train sft|rm|ppo)")
    cfg = load_run_config(config, overrides + ((f"rounds={rounds}",) if rounds else ()), backend, name, allow_pickle,
                          trust_remote_code)
    summaries = run_stages(cfg, echo=click.echo)
    if show:
        show_samples(round_config(cfg, cfg.rounds), show)
    click.echo(f"run folder: {cfg.run_dir}")
    if make_report:
        from factory.report import build_report

        click.echo(f"report: {build_report(cfg.run_dir)}")
    measured = [s for s in summaries if getattr(s, "stage", None) == "heldout"]
    if measured:  # the run ends with what the loop did to the model (the last round's)
        click.echo(measured[-1].note)
    check_failures(summaries, cfg.run_dir)


def stage_options(fn):
    """The options of a one-stage command: --config (defaults without one), --set and the key flags."""
    for option in reversed((config_opt, set_opt, backend_opt, name_opt, pickle_opt, remote_code_opt)):
        fn = option(fn)
    return fn


def run_one_stage(stage: str, config: Path | None, overrides: tuple[str, ...], backend: str | None, name: str | None,
                  allow_pickle: bool, trust_remote_code: bool) -> None:
    """Run ``stage`` alone with the settings of --config, as `factory run` would run it."""
    from factory.pipeline import run_stages

    cfg = load_run_config(config, overrides, backend, name, allow_pickle, trust_remote_code)
    cfg = cfg.model_copy(update={"stages": [stage]})
    check_failures(run_stages(cfg, echo=click.echo), cfg.run_dir)


@click.command()
@stage_options
@user_errors
def generate(config, overrides, backend, name, allow_pickle, trust_remote_code):
    """Answer seed-task instructions with the model; writes generations.jsonl.

    Settings come from the [generate] table of --config (defaults without one).
    """
    run_one_stage("generate", config, overrides, backend, name, allow_pickle, trust_remote_code)


@click.command()
@stage_options
@user_errors
def bootstrap(config, overrides, backend, name, allow_pickle, trust_remote_code):
    """Grow new instructions from the seed tasks (Self-Instruct); writes instructions.jsonl.

    Each request shows the model a numbered list of pool instructions (seeds and
    machine-made ones) and lets it continue the list. Candidates are filtered by
    length, blacklisted words and bad starts, then by ROUGE-L similarity to every
    pool instruction; survivors join the pool. Stops at [bootstrap] target.
    Every request and every candidate's verdict is kept in bootstrap_requests.jsonl.
    """
    run_one_stage("bootstrap", config, overrides, backend, name, allow_pickle, trust_remote_code)


@click.command()
@stage_options
@user_errors
def instances(config, overrides, backend, name, allow_pickle, trust_remote_code):
    """Write inputs and outputs for each new instruction; writes tasks.jsonl.

    Decides per instruction whether it is a classification task (the probability
    of Yes over No), then writes instances output-first for classification tasks
    and input-first for the rest, and filters them. Settings: [instances].
    """
    run_one_stage("instances", config, overrides, backend, name, allow_pickle, trust_remote_code)


@click.command()
@stage_options
@user_errors
def critique(config, overrides, backend, name, allow_pickle, trust_remote_code):
    """Answer each prompt, critique the answer under a principle, revise it; writes
    revisions.jsonl and sft.jsonl.

    A principle is drawn by weight from [critique] constitution for each of the
    [critique] rounds; the constitution's examples go in front as chat turns. Prompts
    come from [critique] prompts (a JSONL of {"prompt": ...}, e.g.
    seeds/red_team_prompts.jsonl) or, without it, from the run's tasks.jsonl.
    """
    run_one_stage("critique", config, overrides, backend, name, allow_pickle, trust_remote_code)


@click.command()
@stage_options
@user_errors
def judge(config, overrides, backend, name, allow_pickle, trust_remote_code):
    """Compare responses under principles with the model as judge; writes preferences.jsonl
    (soft-labelled pairs) and the same pairs in TRL's formats.

    Candidates ([judge] candidates): each critiqued prompt's first answer vs its final
    revision (default), n sampled responses per prompt, or a JSONL of prompt + responses.
    The judge's letter is scored with option log-probabilities, never parsed from text;
    every pair is judged in both orders and the two probabilities averaged, under as
    many principles as [judge] principles says, drawn by weight and averaged too.
    judgments.jsonl keeps every comparison.
    """
    run_one_stage("judge", config, overrides, backend, name, allow_pickle, trust_remote_code)


@click.command()
@stage_options
@user_errors
def rerank(config, overrides, backend, name, allow_pickle, trust_remote_code):
    """Best-of-n: sample n responses per prompt and keep the one the reward model scores
    highest; writes rerank.jsonl, SFT-ready (its messages hold the chosen reply).

    Needs a reward model ([rerank] reward_model, default the run's rm/model from
    `factory train rm`). Prompts come from [rerank] prompts or the run's tasks.jsonl.
    """
    run_one_stage("rerank", config, overrides, backend, name, allow_pickle, trust_remote_code)


def show_samples(cfg: RunConfig, count: int) -> None:
    """A few records of the last stage that ran, so a run ends by showing what it made."""
    from factory.layout import RunLayout
    from factory.records import Generation, Instruction, Preference, Reranked, Revision, Task
    from factory.store import read_jsonl

    layout = RunLayout.of(cfg)
    files = {"generate": (layout.generations, Generation), "bootstrap": (layout.instructions, Instruction),
             "instances": (layout.tasks, Task), "critique": (layout.revisions, Revision),
             "judge": (layout.preferences, Preference), "rerank": (layout.rerank, Reranked)}
    data_stages = [s for s in cfg.stages if s in files]
    if not data_stages:
        return
    last = data_stages[-1]
    path, record_type = files[last]
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
        elif isinstance(rec, Preference):
            flag = ", low confidence" if rec.low_confidence else ""
            click.secho(f"{rec.prompt}  [p_chosen {rec.p_chosen:.2f}, orders "
                        f"{', '.join(f'{q:.2f}' for q in rec.p_orders)}{flag}]", bold=True)
            click.echo(f"  chosen:   {rec.chosen}\n  rejected: {rec.rejected}")
        elif isinstance(rec, Reranked):
            click.secho(f"{rec.prompt}  [rewards {', '.join(f'{r:.2f}' for r in rec.scores)}]", bold=True)
            click.echo(f"  kept ({rec.scores[rec.chosen]:.2f}): {rec.responses[rec.chosen]}")
        elif isinstance(rec, Instruction):
            click.secho(rec.instruction, bold=True)
            click.echo(f"  closest pool instruction ({rec.most_similar[0].score:.2f}): {rec.most_similar[0].instruction}")
        else:
            kind = "classification" if rec.is_classification else "generation"
            click.secho(f"{rec.instruction}  [{kind}, p={rec.p_classification:.2f}]", bold=True)
            for inst in rec.instances[:2]:
                click.echo(f"  input:  {inst.input or '(none)'}\n  output: {inst.output}")
    click.echo("")

"""The ``factory`` command: one thin command per stage, plus run and setup helpers.

User errors (bad config, missing file, unreachable server, full disk) exit with code 2
and a one-paragraph message naming the file, key or server; never a traceback. Exit
code 3 means the run finished but some items failed for good (see factory.failures).
"""

from __future__ import annotations

import json
import os
from functools import wraps
from pathlib import Path

import click

from factory import __version__
from factory.config import ConfigError, RunConfig, load_config


class UserError(click.ClickException):
    exit_code = 2


class ItemsFailed(click.ClickException):
    """The run finished, but the backend failed for good on some items: a rerun retries only them."""

    exit_code = 3


def check_failures(summaries: list, run_dir: Path) -> None:
    from factory.summary import StageSummary

    failed = {s.stage: sum(s.failed.values()) for s in summaries if isinstance(s, StageSummary) and s.failed}
    if failed:
        stages = ", ".join(f"{stage} {n}" for stage, n in failed.items())
        raise ItemsFailed(f"{sum(failed.values())} items failed for good ({stages}) and were left out; each is logged "
                          f"with its reason in {run_dir}/failures.jsonl. Run the same command again to retry only them.")


def user_errors(fn):
    """Turn the errors a user can fix into a clean message and exit code 2."""
    from factory.constitution import ConstitutionError
    from factory.llm.base import BackendError
    from factory.preferences import PreferenceFormatError
    from factory.seeds import SeedError
    from factory.store import WRITE_HINTS, StoreError
    from factory.train import TrainError

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, SeedError, StoreError, BackendError, ConstitutionError, PreferenceFormatError,
                TrainError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        except OSError as e:
            # A full disk or a read-only folder met outside a store (a report, an export, a checkpoint):
            # every writer here writes a temporary file and renames it, so what was there is intact.
            if e.errno not in WRITE_HINTS:
                raise
            where = e.filename or "the output folder"
            raise UserError(f"{where}: cannot write: {e.strerror}{WRITE_HINTS[e.errno]}") from None

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
pickle_opt = click.option(
    "--allow-pickle", is_flag=True,
    help="Load pickle-based weights (pytorch_model.bin) and old pickle checkpoints (sets allow_pickle). "
    "Unpickling can run code hidden in a file: only for files you trust.",
)
remote_code_opt = click.option(
    "--trust-remote-code", is_flag=True,
    help="vllm: run the Python code a model repository ships (sets backend.trust_remote_code). "
    "That code can do anything you can: only for models you trust.",
)


def _load(config: Path | None, overrides: tuple[str, ...], backend: str | None, name: str | None = None,
          allow_pickle: bool = False, trust_remote_code: bool = False) -> RunConfig:
    extra = list(overrides)
    if allow_pickle:
        extra.append("allow_pickle=true")
    if trust_remote_code:
        extra.append("backend.trust_remote_code=true")
    if backend:
        extra.append(f"backend.spec={json.dumps(backend)}")
    if name is not None:  # an empty --name is refused by validation, not ignored
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

    Exit codes: 0 done; 2 a problem you can fix (bad input, wrong key or URL, a full
    disk), named in the message; 3 done, but the model server failed for good on some
    items, logged in RUN/failures.jsonl: the same command again retries only them.
    """


@cli.command()
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

    The whole loop is bootstrap -> instances -> critique -> judge -> rm -> ppo; a config
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
    cfg = _load(config, overrides + ((f"rounds={rounds}",) if rounds else ()), backend, name, allow_pickle,
                trust_remote_code)
    summaries = run_stages(cfg, echo=click.echo)
    if show:
        _show_samples(round_config(cfg, cfg.rounds), show)
    click.echo(f"run folder: {cfg.run_dir}")
    if make_report:
        from factory.report import build_report

        click.echo(f"report: {build_report(cfg.run_dir)}")
    check_failures(summaries, cfg.run_dir)


def stage_command(stage: str, doc: str):
    """A thin command that runs one stage with the settings of --config (defaults without one)."""

    @click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), help="Run config (TOML or YAML).")
    @set_opt
    @backend_opt
    @name_opt
    @pickle_opt
    @remote_code_opt
    @user_errors
    def command(config, overrides, backend, name, allow_pickle, trust_remote_code):
        from factory.pipeline import run_stages

        cfg = _load(config, overrides, backend, name, allow_pickle, trust_remote_code).model_copy(
            update={"stages": [stage]})
        check_failures(run_stages(cfg, echo=click.echo), cfg.run_dir)

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

stage_command(
    "judge",
    """Compare responses under principles with the model as judge; writes preferences.jsonl
    (soft-labelled pairs) and the same pairs in TRL's formats.

    Candidates ([judge] candidates): each critiqued prompt's first answer vs its final
    revision (default), n sampled responses per prompt, or a JSONL of prompt + responses.
    The judge's letter is scored with option log-probabilities, never parsed from text;
    every pair is judged in both orders and the two probabilities averaged, under as
    many principles as [judge] principles says, drawn by weight and averaged too.
    judgments.jsonl keeps every comparison.
    """,
)

stage_command(
    "rerank",
    """Best-of-n: sample n responses per prompt and keep the one the reward model scores
    highest; writes rerank.jsonl, SFT-ready (its messages hold the chosen reply).

    Needs a reward model ([rerank] reward_model, default the run's rm/model from
    `factory train rm`). Prompts come from [rerank] prompts or the run's tasks.jsonl.
    """,
)


@cli.group()
def train():
    """Train on the run's data: SFT on sft.jsonl, a reward model on preferences.jsonl,
    then a policy against the reward model with PPO.

    Each trainer writes into its own folder of the run (sft/, rm/, policy/): a resumable
    checkpoint/, the final model/, and metrics.jsonl. A killed run picks up from its last
    checkpoint when started again; a finished one is left as it is.
    """


def train_command(name: str, module: str, fn: str, doc: str):
    @click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), help="Run config (TOML or YAML).")
    @set_opt
    @name_opt
    @pickle_opt
    @user_errors
    def command(config, overrides, name, allow_pickle):
        import importlib

        cfg = _load(config, overrides, None, name, allow_pickle)
        summary = getattr(importlib.import_module(module), fn)(cfg, echo=click.echo)
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, the first process speaks
            click.echo(json.dumps(summary, indent=2))

    command.__doc__ = doc
    return train.command(name=name)(command)


train_command(
    "sft", "factory.train.sft", "run_sft",
    """Fine-tune a model on chat records (the run's sft.jsonl); loss on the assistant's tokens only.

    Settings: [sft] (model, epochs, batch_size, lr, max_length, held_out, lora). Writes
    sft/model/, a causal LM the hf backend loads (hf:outputs/RUN/sft/model), and a
    checkpoint after each epoch.
    """,
)
train_command(
    "rm", "factory.train.reward", "run_reward",
    """Train a reward model on the run's preference pairs (preferences.jsonl).

    A linear head on a causal LM's backbone, Bradley-Terry loss against each pair's soft
    label p_chosen, so an unsure pair teaches less. Prompts are split into train and
    held-out; held-out accuracy and margin are logged each epoch. The reward is then shifted
    so the SFT references score 0 on average. Settings: [rm]. Writes rm/model/ and rm/eval.json.
    """,
)
train_command(
    "ppo", "factory.train.ppo", "run_ppo",
    """Optimise a policy against the reward model with PPO (RLHF), with a KL penalty to the
    starting policy.

    The policy starts from the run's sft/model (or the embedded model), the value model
    from the reward model (rm/model); prompts are the run's tasks. Settings: [ppo]. Writes
    policy/model/, which can generate the next round (hf:outputs/RUN/policy/model),
    policy/metrics.jsonl and sample generations in policy/samples.jsonl.
    """,
)


@cli.command("judge-eval")
@click.argument("pairs", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["hh", "factory"]), default="hh", show_default=True,
              help="hh: {'chosen', 'rejected'} Human/Assistant dialogues; factory: Preference records (chosen = label).")
@click.option("--constitution", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("principles/harmless.yaml"), show_default=True, help="Principle file whose judge questions are asked.")
@click.option("--principles", "count", default="1", show_default=True, metavar="N|all",
              help="Principles drawn per pair (their labels averaged), or 'all' for every principle on every pair.")
@click.option("--cot", is_flag=True, help="The judge reasons first; its labels are clamped to --cot-band.")
@click.option("--cot-band", nargs=2, type=float, default=(0.4, 0.6), show_default=True)
@click.option("--backend", "spec", default="hf:embedded", show_default=True, metavar="SPEC", help="The judge model.")
@click.option("--batch-size", default=32, show_default=True, help="Pairs judged per batch.")
@click.option("--limit", type=int, help="Judge only the first N pairs.")
@click.option("--seed", default=0, show_default=True, help="Seed for the principle draws.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures as JSON here.")
@user_errors
def judge_eval(pairs, fmt, constitution, count, cot, cot_band, spec, batch_size, limit, seed, report):
    """Measure how often the AI judge agrees with human-labelled PAIRS.

    Every pair is judged in both orders, as the judge stage does. Prints accuracy (agreement
    with the human choice) with a 95% Wilson interval, the position-flip rate (pairs whose
    two orders disagree), the first-position preference, the expected calibration error of
    the judge's confidence with its bins, and a per-principle breakdown.
    """
    from factory.config import BackendConfig
    from factory.constitution import load_constitution
    from factory.judge_eval import format_table, run_judge_eval
    from factory.llm import load_backend
    from factory.preferences import import_hh
    from factory.records import Preference
    from factory.store import read_jsonl

    if count != "all" and not (count.isdigit() and int(count) >= 1):
        raise UserError(f"--principles: expected a positive number or 'all', got {count!r}")
    if not 0 <= cot_band[0] <= 0.5 <= cot_band[1] <= 1:
        raise UserError(f"--cot-band: expected LOW HIGH with 0 <= LOW <= 0.5 <= HIGH <= 1, got {cot_band}")
    judges = load_constitution(constitution)
    labelled = import_hh(pairs)[0] if fmt == "hh" else read_jsonl(pairs, Preference)
    labelled = labelled[:limit] if limit else labelled
    if not labelled:
        raise UserError(f"{pairs}: no pairs to evaluate")
    try:
        backend = load_backend(BackendConfig(spec=spec, batch_size=batch_size * 2))
    except ValueError as e:  # a malformed spec
        raise UserError(f"--backend: {e}") from None
    try:
        figures, _ = run_judge_eval(backend, labelled, judges, "all" if count == "all" else int(count), cot,
                                    tuple(cot_band), seed=seed, batch=batch_size)
    finally:
        backend.close()
    figures["pairs_file"] = str(pairs)
    click.echo(f"judge {figures['judge_model']} under '{figures['constitution']}' on {pairs}\n")
    click.echo(format_table(figures))
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        click.echo(f"\nreport: {report}")


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
    try:
        tmp.write_text(to_yaml(constitution), encoding="utf-8")
        load_constitution(tmp)  # what we write must load back, or nothing is written
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    click.echo(f"wrote {output}: {len(constitution.principles)} principles, {len(constitution.examples)} examples")


@cli.group()
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


def _plain_round(value: str | None) -> int | None:
    """--round as written: digits only, no sign, spaces or underscores that int() would let through."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise click.BadParameter(f"expected a positive whole number, got {value!r}")
    return int(value)


@cli.command("export")
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


@cli.command()
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


@cli.command()
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
    from factory.records import Generation, Instruction, Preference, Revision, Task
    from factory.records import Reranked
    from factory.store import read_jsonl

    files = {"generate": ("generations.jsonl", Generation), "bootstrap": ("instructions.jsonl", Instruction),
             "instances": ("tasks.jsonl", Task), "critique": ("revisions.jsonl", Revision),
             "judge": ("preferences.jsonl", Preference), "rerank": ("rerank.jsonl", Reranked)}
    data_stages = [s for s in cfg.stages if s in files]
    if not data_stages:
        return
    last = data_stages[-1]
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


def main():
    cli(prog_name="factory")


if __name__ == "__main__":  # python -m factory.cli, e.g. under accelerate launch
    main()

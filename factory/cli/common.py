"""What every command shares: the exit-code errors, turning fixable errors into them, the
options that several commands take, and reading a run config with those options applied."""

from __future__ import annotations

import json
from functools import wraps
from pathlib import Path

import click

from factory.config import ConfigError, RunConfig, load_config


class UserError(click.ClickException):
    """A problem the user can fix (bad input, wrong key or URL, a full disk): exit code 2."""

    exit_code = 2


class ItemsFailed(click.ClickException):
    """The run finished, but the backend failed for good on some items: a rerun retries only them."""

    exit_code = 3


def check_failures(summaries: list, run_dir: Path) -> None:
    """Exit with code 3 when a data stage left items out because the backend failed on them for good."""
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
config_opt = click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
                          help="Run config (TOML or YAML).")
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


def load_run_config(config: Path | None, overrides: tuple[str, ...], backend: str | None = None,
                    name: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False) -> RunConfig:
    """CONFIG (defaults without one) with --set and the flags that stand for config keys applied;
    validation is the config model's (a ``ConfigError`` naming the file and key)."""
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

"""The ``factory`` command: one thin command per stage and trainer, plus run and setup helpers.

Each command reads its options, builds the config model they stand for (which does all the
validation) and calls one function of the package. The commands live by family:

- ``stages``: ``run`` and one command per data stage (generate, bootstrap, instances, critique,
  judge, rerank);
- ``training``: ``train sft|rm|ppo|dpo``, through the same entry as ``run`` (manifest, input checks);
- ``judging``: ``judge-eval``;
- ``files``: ``principles check|import`` and ``pairs import|export``;
- ``outputs``: ``export``, ``report``, ``config`` and ``prepare``;
- ``common``: the exit-code errors and the options several commands share.

User errors (bad config, missing file, unreachable server, full disk) exit with code 2
and a one-paragraph message naming the file, key or server; never a traceback. Exit
code 3 means the run finished but some items failed for good (see factory.failures).
"""

from __future__ import annotations

import click

from factory import __version__
from factory.cli import files, judging, outputs, stages, training


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


COMMANDS = (
    stages.run, stages.generate, stages.bootstrap, stages.instances, stages.critique, stages.judge, stages.rerank,
    training.train,
    judging.judge_eval,
    files.principles, files.pairs,
    outputs.export, outputs.report, outputs.config, outputs.prepare,
)
for _command in COMMANDS:
    cli.add_command(_command)


def main():
    cli(prog_name="factory")


__all__ = ["cli", "main"]

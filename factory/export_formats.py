"""The rows of each file format an export writes for a trainer elsewhere: TRL's SFT and preference
types, OpenRLHF's reward-model and PPO inputs, and Self-Instruct / Alpaca.

Each builder turns a ``Run``'s records into a ``Table``: its rows, the files they came from, and
what was left out, by file and reason; ``summary`` says that in the one line an export prints for
each file it writes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from factory.export_records import Run
from factory.inputs import task_prompt_text
from factory.preferences import FORMATS as TRL_PAIR_FORMATS
from factory.preferences import prompt_text


@dataclass
class Table:
    name: str
    rows: list[dict]
    sources: list[str]
    left_out: Counter


def table(name: str, run: Run, sources: list[str], rows: list[dict], extra_left_out: Counter | None = None) -> Table:
    """The table ``name`` of ``rows`` read from the run's ``sources`` splits, with what they left out."""
    left = Counter()
    for s in sources:
        left += run.data[s].left_out
    return Table(name, rows, [run.data[s].file for s in sources], left + (extra_left_out or Counter()))


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


def trl_sft_rows(run: Run) -> Table:
    """TRL's conversational language-modelling type: ``{"messages": [...]}``, nothing else."""
    return table("trl-sft", run, ["sft"], [{"messages": r.messages} for _, r in run.data["sft"].records])


def trl_pairs_rows(run: Run, style: str) -> Table:
    prefs = [r for _, r in run.data["preferences"].records]
    return table("trl-pairs", run, ["preferences"], TRL_PAIR_FORMATS[style](prefs))


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
    return table("openrlhf-rm", run, ["preferences"], rows)


def openrlhf_ppo_rows(run: Run) -> Table:
    """Prompts for OpenRLHF's PPO trainers with their default key: ``{"input": str}``.

    openrlhf/cli/train_ppo.py and train_ppo_ray.py default ``--input_key input``;
    openrlhf/datasets/prompts_dataset.py reads it as text (formatted with ``--input_template``),
    or, under ``--apply_chat_template``, wraps a string in one user turn. A string therefore
    works either way. The prompts are the run's tasks, made into text as factory's own stages and
    PPO make them (``task_prompt_text``).
    """
    rows = [{"input": task_prompt_text(t)} for _, t in run.data["tasks"].records]
    return table("openrlhf-ppo", run, ["tasks"], rows)


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
            multi_turn[run.data["sft"].file, "not single-turn"] += 1
    return table("alpaca", run, ["tasks", "sft"], rows, multi_turn)


ROWS = {"trl-sft": lambda run, style: trl_sft_rows(run), "trl-pairs": trl_pairs_rows,
        "openrlhf-rm": openrlhf_rm_rows, "openrlhf-ppo": lambda run, style: openrlhf_ppo_rows(run),
        "alpaca": lambda run, style: alpaca_rows(run)}
"""file format -> its table of a run, given the style (standard or conversational) it is asked in"""

"""Hugging Face datasets of a run: one typed table per kind of data (``SOURCES``), each row with
its round, saved as a ``DatasetDict`` or Parquet files (``factory.export``) or pushed to the Hub.
"""

from __future__ import annotations

from typing import Callable

from factory.export_formats import Table, summary, table
from factory.export_records import SOURCES, ExportError, Run


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
            out.append((table(split, run, [split], rows), features))
    return out


def dataset(table: Table, features):
    from datasets import Dataset

    return Dataset.from_list(table.rows, features=features)


def dataset_dict(tables: list[tuple[Table, object]]):
    from datasets import DatasetDict

    return DatasetDict({t.name: dataset(t, feats) for t, feats in tables})


def hub_token() -> str | None:
    """The Hugging Face token: HF_TOKEN, else huggingface_hub's stored login (``hf auth login``)."""
    from huggingface_hub import get_token

    return get_token()


def push(run: Run, tables: list[tuple[Table, object]], repo: str, private: bool, echo: Callable[[str], None]) -> None:
    """Push each table to the dataset repository ``repo`` as a config of its own; ``echo`` gets a line for each."""
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

"""The `heldout` stage: what the loop did to the model, measured on prompts it never saw.

The base model (the one the round starts from) and each trained model of the run (``sft/model``,
``dpo/model``, ``policy/model``) answer the same held-out prompts greedily, with room for length
to move (256 new tokens by default). On each reply an objective, model-free axis is read:

- ``words``: its length in words;
- ``lists``: whether it is in list form (two or more lines that start with ``-``, ``*``, ``•`` or
  ``1.`` / ``1)``), so the mean is the share of replies in list form.

Each reply is also flagged when it is degenerate (empty, under 5 words, or looping: word 3-grams
said 4 times or more cover 30% of it), and each trained model's mean per-token KL to the base is computed
exactly (over the whole vocabulary at every position of its own replies).

``heldout/<model>.json`` holds one model's replies, values and settings (written whole, atomically;
a rerun with the same model weights, prompts and settings reuses it), and ``heldout/summary.json``
the means. The stage's line says it in one sentence, e.g.
``held-out replies (48 prompts no stage trained on): 74 words -> 41 words (dpo); constitution concise``.
The base is the model the round generates with (``backend.spec``, then each round's policy): the
trainers should start from it (``sft.model``, ``dpo.model``, ``ppo.policy``), as they do by default
with the embedded model.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from factory.atomic import write_atomic
from factory.inputs import load_prompts
from factory.records import file_sha256
from factory.store import StoreError
from factory.stage import Context, Need, Stage
from factory.summary import StageSummary

if TYPE_CHECKING:
    from factory.config import RunConfig
    from factory.layout import RunLayout

TRAINED = {"sft": "sft", "dpo": "dpo", "ppo": "policy"}
"""each trainer that makes a policy, and its layout folder's attribute"""

LIST_LINE = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,3}[.)])\s+\S")
MIN_WORDS = 5
REPEAT_N = 3
"""a reply is degenerate when one word n-gram of this length makes up much of it"""
REPEAT_SHARE = 0.3
REPEAT_TIMES = 4


# -- the axes, read without a model ---------------------------------------------------------------


def words(text: str) -> int:
    return len(text.split())


def list_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if LIST_LINE.match(line))


def in_list_form(text: str) -> bool:
    return list_lines(text) >= 2


def axis_value(axis: str, text: str) -> float:
    """The axis read on one reply: words, or 1.0 / 0.0 for list form."""
    if axis == "words":
        return float(words(text))
    if axis == "lists":
        return 1.0 if in_list_form(text) else 0.0
    raise ValueError(f"unknown axis {axis!r}: expected words or lists")


def degenerate(text: str) -> bool:
    """Empty, under 5 words, or looping: the words covered by word 3-grams that occur 4 times or more
    make up 30% or more of the reply (a phrase or a whole sentence said over and over)."""
    tokens = text.lower().split()
    if len(tokens) < MIN_WORDS:
        return True
    grams = [tuple(tokens[i : i + REPEAT_N]) for i in range(len(tokens) - REPEAT_N + 1)]
    counts = Counter(grams)
    covered: set[int] = set()
    for i, gram in enumerate(grams):
        if counts[gram] >= REPEAT_TIMES:
            covered.update(range(i, i + REPEAT_N))
    return len(covered) >= REPEAT_SHARE * len(tokens)


def describe(axis: str, value: float) -> str:
    return f"{value:.0f} words" if axis == "words" else f"{100 * value:.0f}% in lists"


# -- statistics over prompts ----------------------------------------------------------------------


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def bootstrap(a: Sequence[float], b: Sequence[float], kind: str, rounds: int = 2000, seed: int = 0,
              ) -> tuple[float, float, float]:
    """(estimate, 2.5th, 97.5th percentile) of mean(a)/mean(b) (``kind="ratio"``) or mean(a) - mean(b)
    (``"difference"``), resampling prompts with replacement; a and b are paired by prompt."""
    if len(a) != len(b) or not a:
        raise ValueError("bootstrap needs two non-empty lists paired by prompt")

    def stat(xs, ys):
        if kind == "ratio":
            return sum(xs) / sum(ys) if sum(ys) else float("nan")
        return mean(xs) - mean(ys)

    rng = random.Random(seed)
    n = len(a)
    values = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        v = stat([a[i] for i in idx], [b[i] for i in idx])
        if v == v:  # a resample whose denominator is 0 has no ratio
            values.append(v)
    values.sort()
    if not values:
        return stat(a, b), float("nan"), float("nan")
    return stat(a, b), values[int(0.025 * len(values))], values[max(0, int(0.975 * len(values)) - 1)]


# -- KL to the base, exact over the vocabulary ----------------------------------------------------


def mean_kl(policy_path: str, base_path: str, prompts: Sequence[str], replies: Sequence[str], device: str = "auto",
            allow_pickle: bool = False) -> float:
    """Mean over reply tokens of KL(policy || base) at each position of the policy's own replies
    (each reply through its end-of-turn token), summed over the whole vocabulary."""
    import torch

    from factory.train.models import load_causal_lm, load_tokenizer, pick_device
    from factory.train.scoring import reply_ids

    dev = pick_device(device)
    tok = load_tokenizer(policy_path)
    policy = load_causal_lm(policy_path, dev, tok, allow_pickle=allow_pickle).eval()
    base = load_causal_lm(base_path, dev, tok, allow_pickle=allow_pickle).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, reply in zip(prompts, replies):
            p_ids, r_ids = reply_ids(tok, [{"role": "user", "content": prompt}], reply)
            if not r_ids:
                continue
            ids = torch.tensor([p_ids + r_ids], device=dev)
            at = slice(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1)  # the positions that predict a reply token
            lp = torch.log_softmax(policy(ids, use_cache=False).logits[0, at].double(), dim=-1)
            lb = torch.log_softmax(base(ids, use_cache=False).logits[0, at].double(), dim=-1)
            total += float((lp.exp() * (lp - lb)).sum())
            count += len(r_ids)
    del policy, base
    return max(0.0, total / count) if count else 0.0  # >= 0 in exact arithmetic; rounding can dip below


# -- the stage ------------------------------------------------------------------------------------


def chosen_models(cfg: "RunConfig") -> list[str]:
    hc = cfg.heldout
    if hc.models != "auto":
        return list(dict.fromkeys(hc.models))
    return ["base"] + [name for name in ("sft", "dpo", "ppo") if name in cfg.stages]


def model_folder(layout: "RunLayout", name: str) -> Path:
    return getattr(layout, TRAINED[name]).model


def weights_digest(folder: Path) -> str:
    """Stands for a trained model's weights: retraining into the same folder changes it."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return ",".join(f"{p.name}:{file_sha256(p)}" for p in files)


def answer(backend, prompts: Sequence[str], params) -> list[str]:
    out = backend.generate([[{"role": "user", "content": p}] for p in prompts], params)
    return [completions[0].text for completions in out]


def local_path(spec: str) -> str | None:
    """The folder an hf spec loads (for the KL pass), or None for a remote model."""
    kind, _, model = spec.partition(":")
    if kind != "hf":
        return None
    from factory.llm.embedded import resolve_model

    return resolve_model(model, "hf")[0]


def measured(record: dict, axis: str) -> dict:
    """``record`` with every reply's value on ``axis`` and the means filled in."""
    replies = record["replies"]
    for r in replies:
        r["value"], r["degenerate"] = axis_value(axis, r["reply"]), degenerate(r["reply"])
    return record | {
        "axis": axis, "mean": mean([r["value"] for r in replies]),
        "degenerate": mean([1.0 if r["degenerate"] else 0.0 for r in replies]),
        "words": mean([float(words(r["reply"])) for r in replies]),
    }


def read_record(path: Path) -> dict | None:
    """A model's earlier replies, or None when there are none or the file is unreadable (answered again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("replies"), list) else None


def run_heldout(ctx: Context) -> StageSummary:
    cfg, layout = ctx.cfg, ctx.layout
    hc = cfg.heldout
    pairs = load_prompts(hc.prompts, hc.limit, layout.tasks)
    ids, prompts = [pid for pid, _ in pairs], [text for _, text in pairs]
    base_spec = ctx.specs.get("generator", cfg.backend.spec)
    kind = "vllm" if base_spec.startswith("vllm:") else "hf"
    base_path = local_path(base_spec)
    # The base stands for its weights when they are a local folder (round 2's base is round 1's policy).
    base_digest = f"{base_spec} " + (weights_digest(Path(base_path)) if base_path and Path(base_path).is_dir()
                                     else str(base_path or ""))
    layout.heldout.mkdir(parents=True, exist_ok=True)
    # The replies depend on the model, the prompts and the decoding, not on the axis or the KL.
    common = {"prompts": prompts, "params": hc.params.model_dump(mode="json")}
    results: dict[str, dict] = {}
    reused = 0

    def wants_kl(name: str) -> bool:
        return name != "base" and hc.kl and kind == "hf" and base_path is not None

    # 1. Each model answers, one engine at a time; a model whose replies are there already is not loaded.
    for name in chosen_models(cfg):
        if name == "base":
            spec, digest = base_spec, base_digest
        else:
            folder = model_folder(layout, name)
            spec, digest = f"{kind}:{folder}", weights_digest(folder)
        settings = {**common, "model": digest}
        path = layout.heldout / f"{name}.json"
        old = read_record(path)
        if old is not None and old.get("settings") == settings:
            if old.get("axis") != hc.axis:  # the same replies, read on another axis
                old = measured(old, hc.axis)
                write_atomic(path, json.dumps(old, ensure_ascii=False, indent=1) + "\n")
            if not wants_kl(name):
                old["kl"] = None
            results[name] = old
            reused += not wants_kl(name) or old.get("kl_base") == base_digest
            continue
        if name == "base":
            backend = ctx.model("generator")
        elif ctx.load is None:
            raise RuntimeError("the heldout stage needs Context.load to answer with a trained model")
        else:
            backend = ctx.load(spec)
        ctx.echo(f"heldout: {name} answers {len(prompts)} prompts ...")
        replies = answer(backend, prompts, hc.params)
        results[name] = measured({
            "model": name, "spec": spec, "settings": settings, "kl": None,
            "replies": [{"id": i, "prompt": p, "reply": r} for i, p, r in zip(ids, prompts, replies)],
        }, hc.axis)
        write_atomic(path, json.dumps(results[name], ensure_ascii=False, indent=1) + "\n")
    # 2. The KL passes load two models with torch: the engines go first. A KL is kept while its base is the same.
    todo = [name for name, record in results.items() if wants_kl(name) and record.get("kl_base") != base_digest]
    if todo and ctx.release is not None:
        ctx.release()
    for name in todo:
        record = results[name]
        record["kl"] = mean_kl(str(model_folder(layout, name)), base_path, prompts,
                               [r["reply"] for r in record["replies"]], hc.device, cfg.allow_pickle)
        record["kl_base"] = base_digest
        write_atomic(layout.heldout / f"{name}.json", json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    summary = {
        "axis": hc.axis, "prompts": len(prompts), "constitution": str(cfg.critique.constitution),
        "models": {name: {k: r[k] for k in ("spec", "mean", "words", "degenerate", "kl")} for name, r in results.items()},
    }
    line = headline(summary)
    summary["line"] = line
    write_atomic(layout.heldout / "summary.json", json.dumps(summary, indent=1) + "\n")
    return StageSummary(stage="heldout", total=len(results), skipped=reused, written=len(results) - reused,
                        output=layout.heldout / "summary.json", note=line)


def headline(summary: dict) -> str:
    """One sentence: the base model's mean on the axis, then each trained model's, last the policy."""
    models, axis = summary["models"], summary["axis"]
    steps = [f"{describe(axis, models['base']['mean'])}" if "base" in models else None]
    steps += [f"{describe(axis, m['mean'])} ({name})" for name, m in models.items() if name != "base"]
    text = " -> ".join(s for s in steps if s)
    return (f"held-out replies ({summary['prompts']} prompts no stage trained on): {text}; "
            f"constitution {Path(summary['constitution']).stem}")


class Heldout(Stage):
    name = section = "heldout"

    def roles(self, cfg):
        return ("generator",) if "base" in chosen_models(cfg) else ()

    def user_files(self, cfg) -> list[Path]:
        return [cfg.heldout.prompts]

    def needs(self, cfg, layout) -> list[Need]:
        return [Need(model_folder(layout, name), f"no {name} model to measure",
                     f"run the {name} stage first (list it before heldout), or leave it out of heldout.models",
                     folder=True)
                for name in chosen_models(cfg) if name != "base"]

    def writes(self, cfg, layout) -> list[Path]:
        return [layout.heldout]

    def check(self, cfg) -> None:
        if not load_prompts(cfg.heldout.prompts, None, Path()):
            raise StoreError(f"{cfg.heldout.prompts}: no prompts (expected JSONL lines of {{\"prompt\": ...}})")

    def run(self, ctx: Context) -> StageSummary:
        return run_heldout(ctx)


STAGE = Heldout()

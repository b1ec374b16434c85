"""The `rerank` stage: best-of-n sampling with the reward model.

For each prompt the generator samples n responses, the reward model (``factory train rm``)
scores each prompt + response, and the highest-scoring response is kept. This is rejection
sampling (Nakano et al. 2021, WebGPT's best-of-n; Touvron et al. 2023, Llama 2's rejection-sampling
fine-tuning): with SFT on its output (``sft.data = outputs/RUN/rerank.jsonl``) it is the cheap
alternative to PPO, and a baseline a PPO policy should beat.

``rerank.jsonl`` keeps every response with its score, and each record's ``messages`` holds the
chosen [user, assistant] conversation, so the file is SFT data as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from factory.inputs import load_prompts
from factory.llm.base import Backend
from factory.records import Reranked, file_sha256, work_key
from factory.stage import Context, Need, Stage
from factory.stageloop import StageLoop
from factory.store import Store
from factory.summary import StageSummary

if TYPE_CHECKING:
    from factory.config import RunConfig
    from factory.layout import RunLayout


# -- scoring --------------------------------------------------------------------------------------


def load_reward_model(path: Path, device: str, allow_pickle: bool = False):
    """(scalar model, tokenizer) of a reward-model folder written by ``factory train rm``."""
    from factory.train import TrainError
    from factory.train.models import HEAD_FILE, ScalarModel, load_tokenizer, pick_device

    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no reward model; run `factory train rm` first, or set rerank.reward_model")
    if not (path / HEAD_FILE).is_file():
        # A plain causal LM would get a random head: its "best" response would be noise.
        raise TrainError(f"{path}: not a reward model (no {HEAD_FILE}); train one with `factory train rm`")
    tok = load_tokenizer(str(path))
    rm = ScalarModel.from_pretrained(path, pick_device(device), tok, allow_pickle=allow_pickle)
    return rm.eval(), tok


# -- the stage ------------------------------------------------------------------------------------


def run_rerank(cfg: "RunConfig", backend: Backend, layout: "RunLayout") -> StageSummary:
    from factory.train.models import HEAD_FILE
    from factory.train.scoring import score

    rc = cfg.rerank
    rm_path = Path(rc.reward_model) if rc.reward_model is not None else layout.rm_model
    rm, tok = load_reward_model(rm_path, rc.device, cfg.allow_pickle)  # before any sampling: a missing RM fails fast
    prompts = load_prompts(rc.prompts, rc.limit, layout.tasks)
    settings = {
        "model": backend.model_id,
        # The head's digest stands for the reward model: retraining it into the same folder makes new keys.
        "reward_model": file_sha256(rm_path / HEAD_FILE),
        "config": rc.model_dump(mode="json", exclude={"prompts", "reward_model", "limit", "batch_size", "device"}),
    }
    items: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for pid, text in prompts:
        key = work_key({"prompt": text}, settings)
        if key not in seen:  # a prompt given twice is one item; its first id names it
            seen.add(key)
            items.append((key, pid, text))
    store = Store(layout.rerank, Reranked)
    keys = {k for k, _, _ in items}
    done = [r for r in store.records() if r.key in keys]
    # One generate call holds about backend.batch_size sequences: n per prompt.
    per_batch = max(1, cfg.backend.batch_size // rc.n)
    loop = StageLoop("rerank", layout, items, key=lambda it: it[0], store=store, batch_size=per_batch, unit="prompt")
    device = next(rm.parameters()).device
    for start, batch in loop.batches():
        # 1. Sample n responses per prompt (a prompt whose request failed for good is left for the next run).
        params = rc.params.model_copy(update={"n": rc.n, "seed": rc.seed + start})
        sampled = loop.ask(backend.generate, batch, [[{"role": "user", "content": text}] for _, _, text in batch],
                           params)
        batch = [it for it, _ in sampled]
        responses = [[c.text for c in completions] for _, completions in sampled]
        # 2. Score every prompt + response with the reward model, read where training read it
        #    (the reply's end-of-turn token); a prompt's n replies share its computation.
        conversations = [[{"role": "user", "content": text}, {"role": "assistant", "content": r}]
                         for (_, _, text), rs in zip(batch, responses) for r in rs]
        flat = score(rm, tok, conversations, rc.batch_size, rc.max_length, device) if conversations else []
        # 3. Keep the best of each prompt's n.
        records = []
        for b, ((key, pid, text), rs) in enumerate(zip(batch, responses)):
            scores = flat[b * rc.n : (b + 1) * rc.n]
            best = max(range(len(rs)), key=lambda i: scores[i])
            records.append(Reranked(
                key=key, source=pid, prompt=text,
                messages=[{"role": "user", "content": text}, {"role": "assistant", "content": rs[best]}],
                responses=rs, scores=scores, chosen=best, reward_model=str(rm_path), model=backend.model_id,
            ))
        loop.append(records)
        done += records
    note = f"best of {rc.n} by the reward model {rm_path}"
    if done:
        best = sum(r.scores[r.chosen] for r in done) / len(done)
        mean = sum(sum(r.scores) / len(r.scores) for r in done) / len(done)
        note += f"; mean reward of the kept response {best:.3f} vs {mean:.3f} for a random one"
    return loop.summary(note=note)


class Rerank(Stage):
    name = section = "rerank"

    def roles(self, cfg):
        return ("generator",)

    def user_files(self, cfg) -> list[Path]:
        return [cfg.rerank.prompts] if cfg.rerank.prompts is not None else []

    def needs(self, cfg, layout) -> list[Need]:
        rc = cfg.rerank
        rm = Path(rc.reward_model) if rc.reward_model is not None else layout.rm_model
        needs = [Need(rm, "no reward model to rerank with", "run `factory train rm` first, or set rerank.reward_model",
                      folder=True)]
        if rc.prompts is None:
            needs.append(Need(layout.tasks, "no prompts to rerank", "run instances first, or set rerank.prompts"))
        return needs

    def writes(self, cfg, layout) -> list[Path]:
        return [layout.rerank]

    def check(self, cfg) -> None:
        if cfg.rerank.prompts is not None:
            load_prompts(cfg.rerank.prompts, None, Path())

    def run(self, ctx: Context) -> StageSummary:
        return run_rerank(ctx.cfg, ctx.model("generator"), ctx.layout)


STAGE = Rerank()

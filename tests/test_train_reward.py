"""The reward-model trainer on a tiny random Llama: the soft Bradley-Terry loss, the shared-prompt
scoring path against the plain one, training, normalisation, exact resume, bad input, LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory.config import load_config
from factory.inputs import load_preferences
from factory.layout import RunLayout
from factory.records import Preference
from factory.train import TrainError
from factory.train import reward as R
from factory.train import scoring
from factory.train.models import HEAD_FILE, ScalarModel, load_tokenizer
from factory.train.optim import seed_all

CPU = torch.device("cpu")

QUESTIONS = [
    "What's the capital of Australia?", "How do I boil an egg?", "Name a prime number.",
    "Why is the sky blue?", "Give me a synonym for happy.", "What is 12 times 12?",
    "How do I reverse a list in Python?", "What's a good name for a cat?", "Translate 'hello' to French.",
    "Summarise the plot of Hamlet in one line.", "What does CPU stand for?", "Is a tomato a fruit?",
]


def pref(question: str, chosen: str, rejected: str, p: float, i: int) -> Preference:
    msgs = [{"role": "user", "content": question}]
    return Preference(key=f"k{i}", prompt=question, messages=msgs, chosen=chosen, rejected=rejected, p_chosen=p,
                      margin=2 * p - 1, judge_model="test", source=f"test:{i}")


def make_prefs() -> list[Preference]:
    """A pair per question with varied lengths and labels, plus one K-way group (3 replies, 3 pairs)."""
    out = []
    for i, q in enumerate(QUESTIONS):
        good = f"A careful answer to: {q} " + "It explains the reasoning step by step. " * (1 + i % 3)
        out.append(pref(q, good, "No idea." if i % 2 else "Whatever.", [0.95, 0.7, 0.55, 1.0][i % 4], i))
    q = "Recommend a book about the sea."
    replies = ["Moby-Dick by Herman Melville, a whaling epic.", "The Old Man and the Sea.", "Books are boring."]
    for n, (a, b) in enumerate([(0, 1), (0, 2), (1, 2)]):
        out.append(pref(q, replies[a], replies[b], 0.8, 100 + n))
    return out


def write_prefs(path: Path, prefs: list[Preference]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.model_dump_json() + "\n" for p in prefs), encoding="utf-8")
    return path


def config(tmp: Path, tiny_model: Path, *extra: str):
    return load_config(None, [f"output_dir={tmp}", "name=r", f"rm.model={tiny_model}", "rm.device=cpu",
                              "rm.batch_size=4", "rm.max_length=64", "rm.lr=1e-3", *extra])


@pytest.fixture
def tiny(tiny_model):
    """(scalar model with a scaled-up head so scores differ visibly, tokenizer)."""
    tok = load_tokenizer(str(tiny_model))
    seed_all(0)
    model = ScalarModel.from_pretrained(tiny_model, CPU, tok)
    with torch.no_grad():
        model.head.weight.mul_(50)
    return model.eval(), tok


def raw_score(model: ScalarModel, seq: scoring.Seq) -> float:
    """A reply's score the plainest way: its own row, ScalarModel.last_scores, bias 0."""
    ids = torch.tensor([list(seq[0]) + list(seq[1])])
    return model.last_scores(ids, torch.ones_like(ids)).item() + model.bias


def test_loss_is_the_soft_bradley_terry_formula(tiny):
    model, tok = tiny
    pairs, _ = R.make_pairs(tok, make_prefs()[:4], 64, soft_labels=True)
    with torch.no_grad():
        terms = []
        for x in pairs:
            d = raw_score(model, x.chosen) - raw_score(model, x.rejected)
            sig = 1 / (1 + math.exp(-d))
            terms.append(-(x.p * math.log(sig) + (1 - x.p) * math.log(1 - sig)))
        by_hand = sum(terms) / len(terms)
        for share in (True, False):
            loss, _ = R.batch_loss(model, pairs, tok.pad_token_id, CPU, share, 128)
            assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert [x.p for x in pairs] == [0.95, 0.7, 0.55, 1.0]
    hard, _ = R.make_pairs(tok, make_prefs()[:4], 64, soft_labels=False)
    assert {x.p for x in hard} == {1.0}


def test_a_soft_label_teaches_less_than_a_confident_one():
    d = torch.zeros(2, requires_grad=True)  # a fresh model: both replies score alike
    for i, p in enumerate([0.55, 0.95]):
        R.bt_loss(d[i: i + 1], torch.tensor([p])).backward()
    weak, strong = d.grad.abs().tolist()
    assert weak == pytest.approx(0.05) and strong == pytest.approx(0.45)  # |p - sigmoid(0)|
    # And the 0.55 pair is satisfied by a small margin: its loss is lowest at d = logit(0.55) ~ 0.2,
    # where a hard label would keep pushing the scores apart.
    grid = torch.linspace(-3, 3, 601)
    best = grid[torch.stack([R.bt_loss(g.view(1), torch.tensor([0.55])) for g in grid]).argmin()].item()
    assert best == pytest.approx(math.log(0.55 / 0.45), abs=0.01)


def test_shared_prompt_path_equals_plain_path(tiny):
    model, tok = tiny
    prefs = make_prefs()
    long = "word " * 80  # longer than max_length: the prompt keeps its end, the reply its start
    prefs.append(pref("Tell me something. " * 20, long, "Short.", 0.9, 200))
    pairs, truncated = R.make_pairs(tok, prefs, 64, soft_labels=True)
    assert truncated >= 1 and all(len(p) + len(r) <= 64 for x in pairs for p, r in (x.chosen, x.rejected))
    seqs = [x.chosen for x in pairs] + [x.rejected for x in pairs]
    packed = scoring.pack(seqs, tok.pad_token_id, 128)
    plain_tokens = len(seqs) * max(len(p) + len(r) for p, r in seqs)
    assert packed.ids.numel() < plain_tokens  # the point: fewer tokens run through the model
    with torch.no_grad():
        plain = scoring.seq_scores(model, seqs, tok.pad_token_id, CPU, False, 128)
        for limit in (128, 40):  # 40: rows fill up and a prompt repeats in a new row
            shared = scoring.seq_scores(model, seqs, tok.pad_token_id, CPU, True, limit)
            torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
        assert plain.std() > 0.05  # the scores differ: the comparison is not of constants
        one = torch.tensor([raw_score(model, s) for s in seqs[:3]])
        torch.testing.assert_close(plain[:3], one, rtol=1e-4, atol=1e-5)
        a, da = R.batch_loss(model, pairs, tok.pad_token_id, CPU, True, 128)
        b, db = R.batch_loss(model, pairs, tok.pad_token_id, CPU, False, 128)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-5)
    # score(): conversations in, normalised rewards out, the same numbers again
    model.bias = 0.25
    convs = [[*prefs[i].messages, {"role": "assistant", "content": prefs[i].chosen}] for i in range(3)]
    got = scoring.score(model, tok, convs, batch_size=2, max_length=64, device=CPU)
    assert got == pytest.approx([v - 0.25 for v in plain[:3].tolist()], abs=1e-4)


def test_gradients_match_between_paths(tiny):
    model, tok = tiny
    pairs, _ = R.make_pairs(tok, make_prefs()[-5:], 64, soft_labels=True)
    grads = []
    for share in (True, False):
        model.zero_grad()
        R.batch_loss(model, pairs, tok.pad_token_id, CPU, share, 128)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[1].norm() > 0
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-5


def test_train_writes_metrics_eval_and_a_normalised_model(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, "rm.epochs=2", "rm.held_out=0.25")
    run = cfg.run_dir
    write_prefs(run / "preferences.jsonl", make_prefs())
    refs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i, q in enumerate(QUESTIONS[:5])]
    (run / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    summary = R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)

    out = run / "rm"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == list(range(1, summary["steps"] + 1))
    assert all(math.isfinite(r["train/loss"]) and "lr" in r and "train/accuracy" in r for r in train)
    assert len(evals) == 2 and all(0 <= r["eval/accuracy"] <= 1 and math.isfinite(r["eval/margin"]) for r in evals)
    report = json.loads((out / "eval.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert summary["pairs"]["train"] + summary["pairs"]["held_out"] == len(make_prefs())
    assert summary["pairs"]["held_out"] > 0 and summary["pairs_per_s"] > 0
    assert summary["normalised_on"] == str(run / "sft.jsonl")

    # parameters changed: backbone against the base, head against its seeded initialisation
    base = load_file(str(tiny_model / "model.safetensors"))
    trained = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(base[f"model.{k}"], v) for k, v in trained.items())
    seed_all(0)
    initial = ScalarModel.from_pretrained(tiny_model, CPU, load_tokenizer(str(tiny_model)))
    assert not torch.equal(initial.head.weight, load_file(str(out / "model" / HEAD_FILE))["weight"])

    # model/ reloads with its bias, and the references score 0 on average
    tok = load_tokenizer(str(out / "model"))
    model = ScalarModel.from_pretrained(out / "model", CPU, tok)
    assert model.bias == pytest.approx(summary["bias"]) and summary["bias"] != 0
    scores = scoring.score(model, tok, [r["messages"] for r in refs], 4, 64, CPU)
    assert abs(sum(scores) / len(scores)) < 1e-4 and max(scores) - min(scores) > 0
    meta = json.loads((out / "model" / "scalar_model.json").read_text())
    assert meta["base_model"] and meta["normalised_on"] == str(run / "sft.jsonl")

    again = R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    assert again["already_finished"] and again["bias"] == summary["bias"]


class Killed(Exception):
    pass


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, tiny_model, monkeypatch):
    extra = ("rm.epochs=2", "rm.batch_size=2", "rm.checkpoint_every=2", "rm.held_out=0.2")
    whole = config(tmp_path / "a", tiny_model, *extra)
    cut = config(tmp_path / "b", tiny_model, *extra)
    for cfg in (whole, cut):
        write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())
    done = R.run_reward(whole.rm, RunLayout.of(whole), echo=lambda *_: None)
    per_epoch = done["steps"] // 2
    # in epoch 2, one step after a mid-epoch checkpoint (they fall on even steps)
    kill_at = per_epoch + 3 if (per_epoch + 3) % 2 else per_epoch + 4
    assert kill_at < 2 * per_epoch

    class Dies(R.Metrics):  # a kill right after a step's metrics line is written
        def log(self, step, **values):
            row = super().log(step, **values)
            if step == kill_at and "train/loss" in values:
                raise Killed
            return row

    monkeypatch.setattr(R, "Metrics", Dies)
    with pytest.raises(Killed):
        R.run_reward(cut.rm, RunLayout.of(cut), echo=lambda *_: None)
    assert not (cut.run_dir / "rm" / "model").exists()
    monkeypatch.undo()
    echoed = []
    R.run_reward(cut.rm, RunLayout.of(cut), echo=echoed.append)
    assert any("resuming" in e and f"step {kill_at - 1}" in e for e in echoed)

    for name in ("model.safetensors", HEAD_FILE):
        a = load_file(str(whole.run_dir / "rm" / "model" / name))
        b = load_file(str(cut.run_dir / "rm" / "model" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows = {}
    for cfg in (whole, cut):
        lines = [json.loads(x) for x in (cfg.run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in lines if "train/loss" in r]
        assert steps == list(range(1, done["steps"] + 1))  # none missing, none twice
        assert len([r for r in lines if "eval/accuracy" in r]) == 2
        rows[cfg.run_dir] = [r["train/loss"] for r in lines if "train/loss" in r]
    assert rows[whole.run_dir] == pytest.approx(rows[cut.run_dir], rel=1e-5)


def test_a_kill_after_the_last_step_does_not_train_again(tmp_path, tiny_model, monkeypatch):
    cfg = config(tmp_path, tiny_model, "rm.held_out=0")
    write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())

    def dies(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(R, "score", dies)  # killed while normalising, after the last step
    with pytest.raises(Killed):
        R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    monkeypatch.undo()
    metrics = cfg.run_dir / "rm" / "metrics.jsonl"
    before = metrics.read_text()
    summary = R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    assert metrics.read_text() == before  # no step ran again
    ckpt = load_file(str(cfg.run_dir / "rm" / "checkpoint" / "model.safetensors"))
    final = load_file(str(cfg.run_dir / "rm" / "model" / HEAD_FILE))
    assert torch.equal(ckpt["head.weight"], final["weight"]) and summary["steps"] > 0


def test_bad_input_is_a_clear_error(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model)
    with pytest.raises(TrainError, match="run the judge stage first"):
        R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    path = cfg.run_dir / "preferences.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n")
    with pytest.raises(TrainError, match="no preference pairs"):
        R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    good = make_prefs()[0].model_dump_json()
    path.write_text(good + "\n" + '{"prompt": "x", "chosen": "a"}\n' + good + "\n")
    with pytest.raises(TrainError, match=rf"{path}:2: not a preference pair"):
        R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    path.write_text(good.replace('"p_chosen":0.95', '"p_chosen":1.5') + "\n")
    with pytest.raises(TrainError, match=rf"{path}:1: p_chosen is 1.5"):
        R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    # a torn last line (a killed judge) is dropped, not an error
    path.write_text(good + "\n" + good[:30])
    with pytest.warns(UserWarning, match="torn"):
        assert len(load_preferences(path)) == 1


def test_lora_trains_only_adapters_and_head(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, "rm.lora.r=4", "rm.held_out=0")
    write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())
    R.run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    base = load_file(str(tiny_model / "model.safetensors"))
    ckpt = load_file(str(cfg.run_dir / "rm" / "checkpoint" / "model.safetensors"))
    lora_b = [k for k in ckpt if "lora_B" in k]
    assert lora_b and all(ckpt[k].abs().sum() > 0 for k in lora_b)  # initialised at 0, trained
    frozen = [k for k in ckpt if k.startswith("backbone.") and "lora_" not in k]
    assert len(frozen) == len(base)  # every base weight is there, and none moved
    for k in frozen:
        name = "model." + k.removeprefix("backbone.base_model.model.").replace(".base_layer", "")
        assert torch.equal(ckpt[k], base[name]), k
    seed_all(0)
    initial = ScalarModel.from_pretrained(tiny_model, CPU, load_tokenizer(str(tiny_model)))
    assert not torch.equal(initial.head.weight, ckpt["head.weight"])
    # the saved model has the adapters merged in: it differs from the base
    merged = load_file(str(cfg.run_dir / "rm" / "model" / "model.safetensors"))
    assert any(not torch.equal(base[f"model.{k}"], v) for k, v in merged.items())

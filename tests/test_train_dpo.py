"""The DPO trainer on a tiny random Llama: the soft-label loss against hand computations, packed
log-probs against plain rows (values and gradients), the reference pass run once and reused,
exact resume, online AI feedback with a stub judge (no judged pair asked again after a kill), LoRA."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_reward import make_prefs, write_prefs

from factory.config import load_config
from factory.constitution import load_constitution
from factory.feedback import Labeller
from factory.layout import RunLayout
from factory.train import TrainError
from factory.train import dpo as D
from factory.train.models import load_causal_lm, load_tokenizer
from factory.train.optim import seed_all
from factory.train.pairs import make_pairs

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(echo=lambda *_: None)


def config(tmp: Path, tiny_model: Path, *extra: str):
    return load_config(None, [f"output_dir={tmp}", "name=r", f"dpo.model={tiny_model}", "dpo.device=cpu",
                              "dpo.batch_size=4", "dpo.max_length=64", "dpo.lr=1e-3", *extra])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- the loss ---------------------------------------------------------------------------------------


def test_loss_is_the_soft_label_formula_by_hand():
    pc, pr = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -5.0])
    rc, rr = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.5, -19.0, -4.0])
    p = torch.tensor([0.9, 0.6, 1.0])
    beta = 0.5
    losses, h = D.dpo_loss(pc, pr, rc, rr, p, beta)
    for n in range(3):
        hand_h = beta * ((pc[n] - rc[n]) - (pr[n] - rr[n])).item()
        hand = -(p[n].item() * math.log(sigmoid(hand_h)) + (1 - p[n].item()) * math.log(sigmoid(-hand_h)))
        assert h[n].item() == pytest.approx(hand_h)
        assert losses[n].item() == pytest.approx(hand, rel=1e-6)
    # IPO: (h / beta - (2p - 1) / (2 beta))^2
    losses, h = D.dpo_loss(pc, pr, rc, rr, p, beta, "ipo")
    for n in range(3):
        hand = (h[n].item() / beta - (2 * p[n].item() - 1) / (2 * beta)) ** 2
        assert losses[n].item() == pytest.approx(hand, rel=1e-6)


def test_a_sure_label_is_the_original_dpo_loss():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 5 for _ in range(4))
    losses, h = D.dpo_loss(pc, pr, rc, rr, torch.ones(16), 0.1)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(h))
    ipo, h = D.dpo_loss(pc, pr, rc, rr, torch.ones(16), 0.1, "ipo")
    torch.testing.assert_close(ipo, (h / 0.1 - 1 / (2 * 0.1)) ** 2)
    # a half-sure label pulls neither way at h = 0, a sure one does
    zero = torch.zeros(1, requires_grad=True)
    for p, pulls in ((0.5, False), (1.0, True)):
        loss, _ = D.dpo_loss(zero, torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor([p]), 0.1)
        (grad,) = torch.autograd.grad(loss.sum(), zero)
        assert (abs(grad.item()) > 1e-6) == pulls


def test_the_nll_term_adds_the_chosen_replys_per_token_loss():
    from factory.train.pairs import Pair
    from factory.train.settings import DPOConfig

    batch = [Pair(((1,), (2, 3)), ((1,), (4,)), 0.8, 0), Pair(((5,), (6,)), ((5,), (7, 8, 9)), 1.0, 1)]
    pc, pr = torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -9.0])
    ref = torch.tensor([[-5.0, -3.5], [-2.5, -8.0]])
    counts = torch.tensor([2.0, 1.0])
    plain = D.Step(DPOConfig(beta=0.2), batch, ref, pc, pr, counts).losses
    with_nll = D.Step(DPOConfig(beta=0.2, nll_coef=0.5), batch, ref, pc, pr, counts).losses
    torch.testing.assert_close(with_nll - plain, 0.5 * torch.tensor([6.0 / 2, 2.0 / 1]))
    hand, _ = D.dpo_loss(pc, pr, ref[:, 0], ref[:, 1], torch.tensor([0.8, 1.0]), 0.2)
    torch.testing.assert_close(plain, hand)


# -- log-probs --------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    seed_all(0)
    return load_causal_lm(str(tiny_model), CPU, tok).eval(), tok


def test_packed_log_probs_equal_plain_rows_and_a_plain_forward_pass(tiny):
    model, tok = tiny
    pairs, _ = make_pairs(tok, make_prefs(), 64, True)
    seqs = [x.chosen for x in pairs] + [x.rejected for x in pairs]
    packed, counts = D.reply_logps(model, seqs, tok.pad_token_id, CPU, True, 128)
    plain, counts2 = D.reply_logps(model, seqs, tok.pad_token_id, CPU, False, 128)
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == counts2.tolist() == [len(r) for _, r in seqs]
    # ... and both equal the model's own log-probs of the reply, one sequence at a time
    for (prompt, reply), got in zip(seqs[:4], packed[:4].tolist()):
        ids = torch.tensor([list(prompt) + list(reply)])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(reply)[:, None]).sum().item()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_packed_gradients_equal_plain_gradients(tiny):
    model, tok = tiny
    pairs, _ = make_pairs(tok, make_prefs()[:6], 64, True)
    grads = []
    for share in (True, False):
        model.zero_grad()
        chosen, rejected, _ = D.pair_logps(model, pairs, tok.pad_token_id, CPU, share, 128)
        losses, _ = D.dpo_loss(chosen, rejected, chosen.detach() + 1, rejected.detach() - 1,
                               torch.tensor([x.p for x in pairs]), 0.1)
        losses.mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6)


# -- the trainer ------------------------------------------------------------------------------------


def test_train_writes_metrics_reference_and_a_model_that_moved(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, "dpo.epochs=2", "dpo.held_out=0.2")
    write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())
    summary = D.run_dpo(cfg.dpo, RunLayout.of(cfg), **QUIET)
    folder = RunLayout.of(cfg).dpo
    rows = [json.loads(x) for x in folder.metrics.read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert name in steps[0] and f"eval/{name}" in rows[-1]
    # the policy starts as the reference: every margin is 0 at step 1, the loss log 2 whatever the label
    assert steps[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert steps[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert steps[-1]["rewards/margins"] > 0.05  # it learned to prefer the chosen replies
    assert summary["accuracy"] is not None and summary["pairs"]["held_out"] > 0
    lines = folder.reference.read_text().splitlines()
    assert "fingerprint" in json.loads(lines[0]) and len(lines) == 1 + len(make_prefs())
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(folder.model / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    again = D.run_dpo(cfg.dpo, RunLayout.of(cfg), **QUIET)
    assert again["already_finished"]


class Killed(Exception):
    pass


def test_reference_pass_runs_once_and_a_killed_pass_goes_on(tmp_path, tiny_model, monkeypatch):
    cfg = config(tmp_path, tiny_model, "dpo.batch_size=2")
    write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())
    add = D.ReferenceFile.add
    computed: list[int] = []

    def dies_on_the_third(self, index, chosen, rejected):
        if len(computed) >= 4:
            raise Killed
        computed.extend(index)
        add(self, index, chosen, rejected)

    monkeypatch.setattr(D.ReferenceFile, "add", dies_on_the_third)
    with pytest.raises(Killed):
        D.run_dpo(cfg.dpo, RunLayout.of(cfg), **QUIET)
    monkeypatch.undo()
    path = RunLayout.of(cfg).dpo.reference
    with open(path, "ab") as f:
        f.write(b'{"i": 9')  # a torn line, as a kill mid-write leaves it
    echoed: list[str] = []
    D.run_dpo(cfg.dpo, RunLayout.of(cfg), echo=echoed.append)
    assert any(f"reference log-probs of {len(make_prefs()) - 4} pairs" in e for e in echoed)
    rows = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    assert sorted(r["i"] for r in rows) == list(range(len(make_prefs())))  # each pair once

    # The values equal a pass made in one go.
    whole = config(tmp_path / "whole", tiny_model, "dpo.batch_size=2")
    write_prefs(whole.run_dir / "preferences.jsonl", make_prefs())
    D.run_dpo(whole.dpo, RunLayout.of(whole), **QUIET)
    one_go = {r["i"]: (r["c"], r["r"]) for r in map(json.loads, RunLayout.of(whole).dpo.reference.read_text()
                                                    .splitlines()[1:])}
    for r in rows:
        assert (r["c"], r["r"]) == pytest.approx(one_go[r["i"]], rel=1e-5)


def test_resume_after_a_kill_matches_an_uninterrupted_run_and_reuses_the_reference(tmp_path, tiny_model,
                                                                                      monkeypatch):
    extra = ("dpo.epochs=2", "dpo.batch_size=2", "dpo.checkpoint_every=2", "dpo.held_out=0.2")
    whole, cut = config(tmp_path / "a", tiny_model, *extra), config(tmp_path / "b", tiny_model, *extra)
    for cfg in (whole, cut):
        write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())
    done = D.run_dpo(whole.dpo, RunLayout.of(whole), **QUIET)
    per_epoch = done["steps"] // 2
    kill_at = per_epoch + 3 if (per_epoch + 3) % 2 else per_epoch + 4

    class Dies(D.Metrics):
        def log(self, step, **values):
            row = super().log(step, **values)
            if step == kill_at and "train/loss" in values:
                raise Killed
            return row

    monkeypatch.setattr(D, "Metrics", Dies)
    with pytest.raises(Killed):
        D.run_dpo(cut.dpo, RunLayout.of(cut), **QUIET)
    monkeypatch.undo()
    reference = RunLayout.of(cut).dpo.reference
    written = reference.read_bytes()
    echoed: list[str] = []
    D.run_dpo(cut.dpo, RunLayout.of(cut), echo=echoed.append)
    assert any("resuming" in e and f"step {kill_at - 1}" in e for e in echoed)
    assert not any("reference log-probs of" in e for e in echoed)  # nothing left to compute
    assert reference.read_bytes() == written
    a = load_file(str(RunLayout.of(whole).dpo.model / "model.safetensors"))
    b = load_file(str(RunLayout.of(cut).dpo.model / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for cfg in (whole, cut):
        rows = [json.loads(x) for x in RunLayout.of(cfg).dpo.metrics.read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, done["steps"] + 1))
        assert len([r for r in rows if "eval/rewards/accuracies" in r]) == 2


def test_lora_trains_adapters_and_saves_a_merged_model(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, "dpo.lora.r=4", "dpo.lr=1e-2")
    write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())
    summary = D.run_dpo(cfg.dpo, RunLayout.of(cfg), **QUIET)
    saved = load_file(str(RunLayout.of(cfg).dpo.model / "model.safetensors"))
    assert not any("lora" in k for k in saved)  # merged: a plain causal LM
    before = load_file(str(tiny_model / "model.safetensors"))
    assert any(not torch.equal(before[k], saved[k]) for k in before if k in saved)
    assert summary["steps"] > 0


def test_bad_input_is_a_clear_error(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model)
    with pytest.raises(TrainError, match="no preference pairs; run the judge stage first, or set dpo.pairs"):
        D.run_dpo(cfg.dpo, RunLayout.of(cfg), **QUIET)
    write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())
    D.run_dpo(cfg.dpo, RunLayout.of(cfg), **QUIET)
    other = load_config(None, [f"output_dir={tmp_path}", "name=r", f"dpo.model={tiny_model}", "dpo.device=cpu",
                               "dpo.batch_size=4", "dpo.max_length=64", "dpo.lr=1e-3", "dpo.beta=0.5"])
    (RunLayout.of(other).dpo.model / "config.json").unlink()  # not finished: the checkpoint is read
    with pytest.raises(TrainError, match="made from other pairs or settings"):
        D.run_dpo(other.dpo, RunLayout.of(other), **QUIET)
    with pytest.raises(TrainError, match="online needs a judge"):
        D.run_dpo(other.dpo.model_copy(update={"online": True, "output": "online"}), RunLayout.of(other), **QUIET)


# -- online AI feedback -----------------------------------------------------------------------------


class StubJudge:
    """A judge whose letter log-probs come from a hash of the request (fixed, different per
    request), prefering (A) more when the first reply is longer; it logs every request it sees."""

    model_id = "stub-judge"

    def __init__(self):
        self.requests: list[str] = []

    def option_logprobs(self, requests, options):
        out = []
        for r in requests:
            text = json.dumps(r)
            self.requests.append(hashlib.sha256(text.encode()).hexdigest())
            body = r[1]["content"]
            a = body.split("Response (A): ")[1].split("Response (B): ")[0]
            b = body.split("Response (B): ")[1].split("\n\nQuestion:")[0]
            noise = int(hashlib.sha256(text.encode()).hexdigest()[:4], 16) / 65536 - 0.5
            pa = sigmoid(0.05 * (len(a) - len(b)) + noise)
            out.append({"A": math.log(pa), "B": math.log(1 - pa)})
        return out

    def generate(self, requests, params):
        raise AssertionError("the labeller only reads option log-probs")

    def close(self):
        pass


def online_config(tmp: Path, tiny_model: Path, *extra: str):
    prompts = tmp / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in
                               ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit."]))
    return config(tmp, tiny_model, "dpo.online=true", f"dpo.prompts={prompts}", "dpo.batch_size=2",
                  "dpo.samples=3", "dpo.steps=4", "dpo.response_length=6", "dpo.temperature=1.5",
                  "dpo.checkpoint_every=1", "judge.constitution=principles/harmless.yaml", *extra)


def labeller(judge: StubJudge, cfg) -> Labeller:
    return Labeller(judge, load_constitution(cfg.judge.constitution), 1, cfg.dpo.seed)


def test_online_dpo_survives_a_kill_without_asking_the_judge_again(tmp_path, tiny_model, monkeypatch):
    whole, cut = online_config(tmp_path / "a", tiny_model), online_config(tmp_path / "b", tiny_model)
    judge = StubJudge()
    done = D.run_dpo(whole.dpo, RunLayout.of(whole), labeller=labeller(judge, whole), **QUIET)
    assert done["steps"] == 4 and done["pairs"] > 0
    rows = [json.loads(x) for x in RunLayout.of(whole).dpo.online.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # 2 prompts x 3 samples, every pair in both orders
        assert len(r["samples"]) == 2 and all(len(s) == 3 for s in r["samples"])
        assert r["judge_calls"] == 2 * 3 * 2
        for m in r["labels"]:
            assert all(m[i][j] + m[j][i] == pytest.approx(1) for i in range(3) for j in range(3) if i != j)

    class Dies(D.Metrics):  # killed after step 3's samples and labels are written, before its checkpoint
        def log(self, step, **values):
            super().log(step, **values)
            if step == 3:
                raise Killed

    first, second = StubJudge(), StubJudge()
    monkeypatch.setattr(D, "Metrics", Dies)
    with pytest.raises(Killed):
        D.run_dpo(cut.dpo, RunLayout.of(cut), labeller=labeller(first, cut), **QUIET)
    monkeypatch.undo()
    D.run_dpo(cut.dpo, RunLayout.of(cut), labeller=labeller(second, cut), **QUIET)
    assert not set(first.requests) & set(second.requests)  # no judged pair asked again
    assert len(second.requests) == 2 * 3 * 2  # only step 4 was judged
    assert sorted(first.requests + second.requests) == sorted(judge.requests)  # the same requests in all
    a = load_file(str(RunLayout.of(whole).dpo.model / "model.safetensors"))
    b = load_file(str(RunLayout.of(cut).dpo.model / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in RunLayout.of(cut).dpo.metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_online_pairs_put_the_judges_favourite_first():
    m = [[0.5, 0.8, 0.3], [0.2, 0.5, 0.45], [0.7, 0.55, 0.5]]
    assert D.online_pairs(m, ["a", "b", "c"]) == [(0, 1, 0.8), (2, 0, pytest.approx(0.7)), (2, 1, pytest.approx(0.55))]
    assert D.online_pairs(m, ["a", " a", "c"]) == [(2, 0, pytest.approx(0.7)), (2, 1, pytest.approx(0.55))]


def test_a_kill_after_the_last_checkpoint_saves_without_training_again(tmp_path, tiny_model, monkeypatch):
    cfg = config(tmp_path, tiny_model, "dpo.held_out=0")
    write_prefs(cfg.run_dir / "preferences.jsonl", make_prefs())

    def dies(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(D, "save_final", dies)  # killed while writing model/, after the last checkpoint
    with pytest.raises(Killed):
        D.run_dpo(cfg.dpo, RunLayout.of(cfg), **QUIET)
    monkeypatch.undo()
    folder = RunLayout.of(cfg).dpo
    before = folder.metrics.read_text()
    echoed: list[str] = []
    summary = D.run_dpo(cfg.dpo, RunLayout.of(cfg), echo=echoed.append)
    assert folder.metrics.read_text() == before  # no step ran again
    assert any("training had finished" in e for e in echoed) and summary["steps"] > 0
    ckpt = load_file(str(folder.checkpoint / "model.safetensors"))
    final = load_file(str(folder.model / "model.safetensors"))
    shared = [k for k in final if k in ckpt]  # (a tied embedding is saved under one of its names)
    assert len(shared) >= len(final) - 1 and all(torch.equal(ckpt[k], final[k]) for k in shared)


def test_online_dpo_with_lora_takes_the_base_as_its_reference(tmp_path, tiny_model):
    cfg = online_config(tmp_path, tiny_model, "dpo.lora.r=4", "dpo.lr=1e-2", "dpo.steps=2")
    summary = D.run_dpo(cfg.dpo, RunLayout.of(cfg), labeller=labeller(StubJudge(), cfg), **QUIET)
    rows = [json.loads(x) for x in RunLayout.of(cfg).dpo.metrics.read_text().splitlines()]
    # step 1: adapters start at zero (LoRA's B = 0), so the policy is its reference: every margin 0
    assert rows[0]["pairs"] > 0 and rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    saved = load_file(str(RunLayout.of(cfg).dpo.model / "model.safetensors"))
    assert not any("lora" in k for k in saved) and summary["steps"] == 2
    ids = json.loads(RunLayout.of(cfg).dpo.online.read_text().splitlines()[0])["ids"]
    assert len(ids) == 2 and all(1 <= len(r) <= 6 for group in ids for r in group)  # the sampled ids, kept

"""The trainers as several processes: the real `accelerate launch --multi_gpu --num_processes 2`
on the CPU (gloo), with the tiny model. Two processes must train what one does: the same global
batch and seed give the same weights, every step is logged once, rank 0 alone writes, and a
checkpoint resumes under the same or another number of processes (each loads it)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from factory.config import load_config
from factory.layout import RunLayout
from factory.records import Preference
from factory.train import ppo, reward, sft
from factory.train.models import HEAD_FILE, ScalarModel, load_tokenizer

FACTORY = str(Path(sys.executable).with_name("factory"))  # the console script, as a user launches it


def launch(script: str, *args: str, timeout: float = 300) -> str:
    """Run ``script args`` as 2 processes through `accelerate launch`; its output (it must succeed)."""
    proc = subprocess.run(launch_cmd(script, *args), capture_output=True, text=True, env=launch_env(),
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def launch_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), script, *args]


def launch_env() -> dict[str, str]:
    # One thread a process: the tiny model's ops are too small to share 2 busy cores.
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def launch_and_kill(script: str, *args: str, watch: Path, lines: int, timeout: float = 300) -> None:
    """Launch like ``launch`` and SIGKILL the launcher and both workers once ``watch`` holds ``lines``
    lines. The workers run in sessions of their own (torchrun starts them so), so each is killed by pid."""
    import psutil

    log = tempfile.TemporaryFile()  # a file, not a pipe: a pipe nobody reads fills up and blocks
    proc = subprocess.Popen(launch_cmd(script, *args), stdout=log, stderr=subprocess.STDOUT, env=launch_env())
    deadline = time.monotonic() + timeout
    try:
        while not (watch.is_file() and watch.read_bytes().count(b"\n") >= lines):
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(log.read().decode()[-6000:])
            assert time.monotonic() < deadline, f"{watch} did not reach {lines} lines"
            time.sleep(0.02)
    finally:
        try:
            family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:  # it had exited: the assertion above says why
            family = []
        for p in family:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        log.close()


def overrides(section: str, out: Path, **fields) -> list[str]:
    return [f"output_dir={out}", "name=run"] + [f"{section}.{k}={v}" for k, v in fields.items()]


def flags(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    """Every tensor of two safetensors files within 1e-5: float noise of a different batch split
    (different padding widths), against steps of lr = 1e-3 that a wrong gradient would change."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if k not in skip:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{a.name}:{k}: {m}")


# -- the collectives themselves -------------------------------------------------------------------

WORKER = textwrap.dedent('''
    """Each rank computes with distributed.Dist; the test compares with one process's results."""
    import json, sys
    import torch
    from factory.train import TrainError, distributed
    from factory.train.distributed import processes
    from factory.train.ppo import masked_whiten

    distributed.BUCKET = 4  # buckets of 4 values: a weight and its bias go in separate collectives
    dist, device = processes("cpu")
    r, out = dist.rank, {}
    out["shards"] = [dist.shard(list(range(n))) for n in (0, 1, 5)]
    out["total"] = dist.total(r + 1, 0.25)

    x = torch.tensor([[1.0, 2.0, 30.0, 0.0], [4.0, -5.0, 6.0, 7.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    out["whitened"] = masked_whiten(x[r: r + 1], mask[r: r + 1], dist=dist).tolist()

    # Shares of a batch, each loss a sum over its rows divided by the whole batch's size.
    for name, n in (("even", 4), ("one_row", 1)):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        data = torch.arange(n * 3, dtype=torch.float32).view(n, 3) / 7
        mine = dist.shard(list(range(n)))
        if mine:
            (model(data[mine]) ** 2).sum().div(n).backward()
        dist.sum_grads(list(model.parameters()))
        out[name] = [p.grad.tolist() for p in model.parameters()]
    unused = torch.nn.Linear(2, 2)
    dist.sum_grads(list(unused.parameters()))
    out["unused_grad_is_none"] = all(p.grad is None for p in unused.parameters())

    out["gathered"] = dist.gather({"rank": r})
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(r)
    dist.broadcast({"m": model})
    out["broadcast"] = model.weight.tolist()
    dist.check_same({"m": model})  # the same now: no error
    with torch.no_grad():
        model.weight[0, 0] += r  # rank 1 drifts
    try:
        dist.check_same({"m": model})
        out["drift"] = "not noticed"
    except TrainError as e:
        out["drift"] = str(e)
    with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
        json.dump(out, f)
''')


def test_collectives_across_two_processes(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    launch(str(tmp_path / "worker.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert [r["shards"] for r in ranks] == [[[], [0], [0, 1, 2]], [[], [], [3, 4]]]
    assert ranks[0]["total"] == ranks[1]["total"] == [3, 0.5]

    # Whitening over both processes' entries is the whitening of them all in one process.
    x = torch.tensor([[1.0, 2.0, 30.0, 0.0], [4.0, -5.0, 6.0, 7.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    whole = ppo.masked_whiten(x, mask)
    together = torch.tensor(ranks[0]["whitened"] + ranks[1]["whitened"])
    torch.testing.assert_close(together, whole)
    assert not torch.allclose(ppo.masked_whiten(x[:1], mask[:1]), whole[:1], atol=1e-3)  # each alone differs

    # Summed share gradients are the whole batch's mean gradient, an empty share included.
    for name, n in (("even", 4), ("one_row", 1)):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        data = torch.arange(n * 3, dtype=torch.float32).view(n, 3) / 7
        (model(data) ** 2).sum().div(n).backward()
        for r in ranks:
            for got, p in zip(r[name], model.parameters()):
                torch.testing.assert_close(torch.tensor(got), p.grad)
    assert all(r["unused_grad_is_none"] for r in ranks)  # AdamW skips it, as with one process

    assert ranks[0]["gathered"] == [{"rank": 0}, {"rank": 1}] and ranks[1]["gathered"] is None
    assert ranks[0]["broadcast"] == ranks[1]["broadcast"] == [[0.0, 0.0], [0.0, 0.0]]
    assert all("drifted apart" in r["drift"] for r in ranks)  # every rank stops, none waits forever


# -- SFT: a one-process checkpoint, resumed and finished by two ------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France, on the Seine."}],
    [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6, since three and three make six."}],
    [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour !"}],
    [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two, three, four, five."}],
]


def test_sft_two_processes_resume_and_match_one(tmp_path, tiny_model, monkeypatch):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    # 4 training conversations of different lengths in batches of 3: the two shares of a batch
    # hold different numbers of assistant tokens (a mean per share would weigh them wrongly), and
    # each epoch's last batch is a single conversation: the second process's share is empty.
    settings = dict(model=tiny_model, device="cpu", epochs=3, batch_size=3, lr=1e-3, held_out=0.2, max_length=64,
                    data=data, checkpoint_every=1)
    one = load_config(None, overrides("sft", tmp_path / "one", **settings))
    sft.run_sft(one.sft, RunLayout.of(one), echo=lambda *_: None)

    # One process stops in step 4 (calls: steps 1, 2, the eval loss, step 3, step 4), so the last
    # checkpoint is step 3's, mid-epoch; two processes go on from it.
    two = overrides("sft", tmp_path / "two", **settings)
    real, calls = sft.batch_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "batch_loss", interrupted)
    run_cfg = load_config(None, two)
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft(run_cfg.sft, RunLayout.of(run_cfg), echo=lambda *_: None)
    monkeypatch.undo()
    out = launch(FACTORY, "train", "sft", *flags(two))
    assert out.count("sft: resuming from") == 1 and "at step 3" in out  # rank 0 alone reports
    assert out.count("sft: 6 steps, train loss") == 1

    a, b = tmp_path / "one" / "run" / "sft", tmp_path / "two" / "run" / "sft"
    assert_same_weights(a / "model" / "model.safetensors", b / "model" / "model.safetensors")
    base = load_file(str(tiny_model / "model.safetensors"))
    moved = load_file(str(b / "model" / "model.safetensors"))
    assert (moved["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-3
    ma, mb = rows(a / "metrics.jsonl"), rows(b / "metrics.jsonl")
    steps = [r for r in mb if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # each step once: rank 0 alone logs
    assert [r["epoch"] for r in mb if "train/epoch_loss" in r] == [1, 2, 3]
    for ra, rb in zip(ma, mb):  # the global batch's loss and token counts, as one process logs them
        assert ra.keys() == rb.keys()
        for k in ("train/loss", "train/epoch_loss", "eval/loss", "tokens", "assistant_tokens", "grad_norm"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5), k
    assert not list(b.glob("*.tmp")) and json.loads((b / "summary.json").read_text())["steps"] == 6


# -- reward model: two processes, killed and resumed ----------------------------------------------

QUESTIONS = ["What's the capital of Australia?", "How do I boil an egg?", "Name a prime number.",
             "Why is the sky blue?", "Give me a synonym for happy.", "What is 12 times 12?",
             "How do I reverse a list in Python?", "What's a good name for a cat?", "Translate 'hello' to French.",
             "What does CPU stand for?", "Is a tomato a fruit?"]


def write_prefs(path: Path) -> None:
    prefs = []
    for i, q in enumerate(QUESTIONS):
        good = f"A careful answer to: {q} " + "It explains the reasoning step by step. " * (1 + i % 3)
        prefs.append(Preference(key=f"k{i}", prompt=q, messages=[{"role": "user", "content": q}], chosen=good,
                                rejected="No idea." if i % 2 else "Whatever.", p_chosen=[0.95, 0.7, 0.55, 1.0][i % 4],
                                margin=0.5, judge_model="test", source=f"test:{i}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.model_dump_json() + "\n" for p in prefs))


def test_reward_two_processes_killed_resumed_match_one(tmp_path, tiny_model):
    settings = dict(model=tiny_model, device="cpu", batch_size=3, max_length=64, lr=1e-3, epochs=2, held_out=0.2,
                    checkpoint_every=1)
    one = load_config(None, overrides("rm", tmp_path / "one", **settings))
    two = overrides("rm", tmp_path / "two", **settings)
    for cfg in (one, load_config(None, two)):
        write_prefs(cfg.run_dir / "preferences.jsonl")
    summary = reward.run_reward(one.rm, RunLayout.of(one), echo=lambda *_: None)
    assert summary["steps"] == 6  # 9 training pairs, 3 a step, 2 epochs

    a, b = tmp_path / "one" / "run" / "rm", tmp_path / "two" / "run" / "rm"
    # Killed (every process) once step 2 is logged: step 1's checkpoint, written by two processes, is whole.
    launch_and_kill(FACTORY, "train", "rm", *flags(two), watch=b / "metrics.jsonl", lines=2)
    assert not (b / "model").exists()
    assert any((b / folder / "state.json").is_file() for folder in ("checkpoint", "checkpoint.old"))
    out = launch(FACTORY, "train", "rm", *flags(two))
    assert out.count("rm: resuming from") == 1

    # The head's bias has no gradient in exact arithmetic (it cancels in r_chosen - r_rejected), so
    # AdamW turns float noise into lr-sized steps: it is compared through the normalised scores below.
    for name in ("model.safetensors", HEAD_FILE):
        assert_same_weights(a / "model" / name, b / "model" / name, skip=("bias",))
    head_a, head_b = load_file(str(a / "model" / HEAD_FILE)), load_file(str(b / "model" / HEAD_FILE))
    bias_a, bias_b = (json.loads((x / "model" / "scalar_model.json").read_text())["bias"] for x in (a, b))
    assert head_b["bias"].item() - bias_b == pytest.approx(head_a["bias"].item() - bias_a, abs=1e-5)

    ma, mb = rows(a / "metrics.jsonl"), rows(b / "metrics.jsonl")
    assert [r["step"] for r in mb if "train/loss" in r] == list(range(1, 7))  # each once, the killed ones too
    for ra, rb in zip(ma, mb):
        for k in ("train/loss", "train/accuracy", "train/margin", "eval/accuracy", "eval/margin", "eval/loss"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra["step"])
    ea, eb = (json.loads((x / "eval.json").read_text()) for x in (a, b))
    assert [e["epoch"] for e in eb["epochs"]] == [1, 2]
    assert eb["summary"]["accuracy"] == ea["summary"]["accuracy"]


# -- PPO: chosen rollouts, so that one process can draw the same ones --------------------------------

ROLLOUTS = textwrap.dedent('''
    import torch
    from factory.train import ppo

    real_sample = ppo.sample


    def chosen_rollouts(model, ids, mask, n_tokens, temperature, eos_id, greedy=False):
        """PPO's training rollouts chosen instead of sampled: each process draws from a random stream
        of its own, so no single process would draw the same ones. A prompt's response is a function
        of the prompt alone, ends with EOS after 1 to n_tokens tokens (so the processes' shares hold
        different token counts), and its log-probs are the policy's, as sampling would give them.
        Evals stay greedy; the update's arithmetic is untouched."""
        if greedy:
            return real_sample(model, ids, mask, n_tokens, temperature, eos_id, greedy=True)
        rows = []
        for row, keep in zip(ids, mask.bool()):
            key = int(row[keep].sum())
            tokens = [100 + key * (k + 3) % 5000 for k in range(n_tokens)]
            tokens[key % n_tokens] = eos_id
            rows.append(tokens)
        responses = torch.tensor(rows, device=ids.device)
        full = torch.cat([ids, responses], 1), torch.cat([mask, torch.ones_like(responses)], 1)
        return responses, ppo.response_logprobs(model, *full, n_tokens, temperature)[0]
''')

CHOSEN_CLI = ROLLOUTS + textwrap.dedent('''
    import sys
    from factory.cli import cli

    ppo.sample = chosen_rollouts
    cli(sys.argv[1:])
''')


def test_ppo_two_processes_match_one(tmp_path, tiny_model, monkeypatch):
    tok = load_tokenizer(str(tiny_model))
    rm_dir = tmp_path / "rm"
    torch.manual_seed(1)
    ScalarModel.from_pretrained(tiny_model, torch.device("cpu"), tok).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    topics = ["tea", "rain", "maps", "bread", "owls", "clocks", "snow", "bikes", "glass", "moss", "ink", "kites"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n" for t in topics))
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Name a colour of {t}."},
        {"role": "assistant", "content": f"{t.title()} can be grey."}]}) + "\n" for t in topics))
    # Every piece of the loss on (whitened rewards and advantages, value clipping, PPO-ptx, adaptive
    # KL); 3 held-out prompts: shares of 2 and 1, gathered back in order. One mini-batch of all the
    # rollouts: each process shuffles its own rollouts into mini-batches (as TRL's PPO trainer does),
    # so smaller mini-batches would hold other rollouts together than one process's do.
    settings = dict(policy=tiny_model, reward_model=rm_dir, prompts=prompts, steps=2, batch_size=4, mini_batch_size=4,
                    ppo_epochs=2, response_length=8, max_prompt_length=40, eval_prompts=3, eval_every=2,
                    checkpoint_every=1, device="cpu", lr=1e-3, whiten_rewards="true", adaptive_kl="true",
                    ptx_coef=0.5, sft_data=sft_data)
    (tmp_path / "chosen_cli.py").write_text(CHOSEN_CLI)
    out = launch(str(tmp_path / "chosen_cli.py"), "train", "ppo", *flags(overrides("ppo", tmp_path / "two", **settings)))
    assert out.count("ppo: 2 steps, eval score") == 1
    defined: dict = {}
    exec(ROLLOUTS, defined)
    monkeypatch.setattr(ppo, "sample", defined["chosen_rollouts"])
    run_cfg = load_config(None, overrides("ppo", tmp_path / "one", **settings))
    ppo.run_ppo(run_cfg.ppo, RunLayout.of(run_cfg), echo=lambda *_: None)

    a, b = tmp_path / "one" / "run" / "policy", tmp_path / "two" / "run" / "policy"
    assert_same_weights(a / "model" / "model.safetensors", b / "model" / "model.safetensors")
    assert_same_weights(a / "checkpoint" / "value.safetensors", b / "checkpoint" / "value.safetensors")
    start = load_file(str(tiny_model / "model.safetensors"))
    trained = load_file(str(b / "model" / "model.safetensors"))
    assert max((start[k] - trained[k]).abs().max() for k in start) > 1e-3

    ma, mb = rows(a / "metrics.jsonl"), rows(b / "metrics.jsonl")
    assert [r["step"] for r in mb] == [0, 1, 2]  # each once: rank 0 alone logs
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k, v in ra.items():  # every statistic over both processes' rollouts, as one process's
            if k not in ("elapsed_s", "step") and not k.startswith("time/"):
                assert math.isfinite(rb[k]) and rb[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, ra["step"])
    assert mb[2]["kl_coef"] != mb[1]["kl_coef"]  # adaptive, on the KL of both processes' rollouts
    assert all(r["val/num_eos_tokens"] == 4 for r in mb[1:])  # every chosen response ends, at its own length

    samples, alone = rows(b / "samples.jsonl"), rows(a / "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 0, 0, 2, 2, 2]
    assert [(s["step"], s["prompt"], s["response"]) for s in samples] == \
        [(s["step"], s["prompt"], s["response"]) for s in alone]
    assert [s["score"] for s in samples] == pytest.approx([s["score"] for s in alone], abs=1e-5)

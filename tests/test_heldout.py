"""The heldout stage (what the loop did to the model, on prompts it never saw) and bench/reshape.py.

The axes and statistics are checked on hand-made replies; the stage and the benchmark's plumbing
run end to end on the tiny random Llama (conftest), whose text is noise.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from factory.cli import cli
from factory.heldout import axis_value, bootstrap, degenerate, in_list_form, list_lines, mean_kl, words

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_axes_read_without_a_model():
    assert words("Boil the water, then   pour.\nDone") == 6
    listed = "Three things:\n- flour\n- water\n1. knead\n2) rest"
    assert list_lines(listed) == 4 and in_list_form(listed) and axis_value("lists", listed) == 1.0
    assert not in_list_form("One line:\n- only one item")  # a single item is not list form
    assert not in_list_form("In 2024 prices rose.\nIn 2025 they fell.")  # numbers without a dot/paren
    assert axis_value("words", "a b c") == 3.0
    with pytest.raises(ValueError, match="unknown axis"):
        axis_value("colour", "x")


def test_degenerate_replies():
    assert degenerate("") and degenerate("Yes, of course.")  # empty, under 5 words
    assert degenerate("I am sorry. " * 20)
    assert degenerate("Start here: " + "and then the " * 6 + "and so on until it ends now.")
    sentence = "Water boils at a lower temperature on a mountain because the air is thinner. "
    assert degenerate("Here is why. " + sentence * 5 + "It takes longer to cook pasta there, so plan for it, "
                      "and keep the lid on the pot to save fuel and time while you wait for it.")
    prose = ("Soak the beans overnight, then simmer them with an onion and a bay leaf until soft. "
             "Season at the end, because salt added early can keep the skins tough.")
    assert not degenerate(prose)
    assert not degenerate("- eggs\n- milk\n- flour\n- butter\n- sugar")


def test_bootstrap_ratio_and_difference():
    a, b = [10.0, 20.0, 30.0, 40.0], [5.0, 10.0, 10.0, 15.0]
    est, lo, hi = bootstrap(a, b, "ratio")
    assert est == pytest.approx(100 / 40) and lo <= est <= hi
    est, lo, hi = bootstrap([1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], "difference")
    assert est == pytest.approx(0.5) and lo <= est <= hi and lo >= -0.25
    same = [3.0] * 8
    assert bootstrap(same, same, "ratio") == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap([1.0], [1.0, 2.0], "ratio")


def test_kl_is_zero_to_itself_and_matches_a_plain_computation(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.train.scoring import reply_ids

    prompts, replies = ["Name a fruit.", "Say hi."], ["An apple, or a pear.", "Hi there!"]
    assert mean_kl(str(tiny_model), str(tiny_model), prompts, replies, "cpu") == pytest.approx(0.0, abs=1e-6)
    # A copy with its weights nudged: KL > 0, and equal to torch's kl_div summed over the reply positions.
    other = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "nudged"
    other.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.save_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    other.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, reply in zip(prompts, replies):
            p, r = reply_ids(tok, [{"role": "user", "content": prompt}], reply)
            ids = torch.tensor([p + r])
            lp = torch.log_softmax(other(ids).logits[0, len(p) - 1 : len(p) + len(r) - 1], -1)
            lb = torch.log_softmax(base(ids).logits[0, len(p) - 1 : len(p) + len(r) - 1], -1)
            total += float(torch.nn.functional.kl_div(lb, lp, log_target=True, reduction="sum"))
            count += len(r)
    kl = mean_kl(str(folder), str(tiny_model), prompts, replies, "cpu")
    assert kl > 1e-4 and kl == pytest.approx(total / count, rel=1e-4)


def heldout_prompts(folder: Path, n: int = 3) -> Path:
    path = folder / "heldout.jsonl"
    path.write_text("".join(json.dumps({"id": f"h{i}", "prompt": f"Tell me about topic {i}."}) + "\n"
                            for i in range(n)))
    return path


def test_the_stage_measures_base_and_each_trained_model(tmp_path, tiny_model):
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n"
                               for t in ("tea", "rain", "maps", "owls")))
    held = heldout_prompts(tmp_path)
    config = {
        "name": "held", "output_dir": str(tmp_path / "out"), "stages": ["critique", "judge", "sft", "dpo", "heldout"],
        "backend": {"spec": f"hf:{tiny_model}", "batch_size": 16, "device": "cpu"},
        "critique": {"prompts": str(prompts), "params": {"max_tokens": 6}},
        "sft": {"model": str(tiny_model), "batch_size": 2, "device": "cpu", "lr": 1e-3},
        "dpo": {"batch_size": 2, "held_out": 0.25, "max_length": 64, "device": "cpu", "lr": 1e-3},
        "heldout": {"prompts": str(held), "axis": "lists", "params": {"max_tokens": 8, "temperature": 0}},
    }
    path = tmp_path / "held.json.yaml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["run", str(path), "--show", "0", "--no-report"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "held" / "heldout"
    summary = json.loads((folder / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "sft", "dpo"] and summary["prompts"] == 3
    assert summary["line"] in result.output and "held-out replies (3 prompts" in summary["line"]
    assert result.output.rstrip().splitlines()[-1] == summary["line"]  # `factory run` ends with it
    base = json.loads((folder / "base.json").read_text())
    assert [r["id"] for r in base["replies"]] == ["h0", "h1", "h2"] and base["kl"] is None
    for name in ("sft", "dpo"):
        record = json.loads((folder / f"{name}.json").read_text())
        values = [axis_value("lists", r["reply"]) for r in record["replies"]]
        assert record["mean"] == pytest.approx(sum(values) / 3) and record["kl"] is not None and record["kl"] >= 0
        assert record["spec"] == f"hf:{tmp_path / 'out' / 'held' / name / 'model'}"
    # A rerun reuses every model's replies, also to read them on another axis; a changed setting redoes them.
    again = CliRunner().invoke(cli, ["run", str(path), "--show", "0", "--no-report"])
    assert again.exit_code == 0 and "heldout: 0 written, 3 already done" in again.output, again.output
    before = json.loads((folder / "dpo.json").read_text())["replies"]
    words = CliRunner().invoke(cli, ["run", str(path), "--show", "0", "--no-report", "--set", "heldout.axis=words"])
    assert words.exit_code == 0 and "heldout: 0 written, 3 already done" in words.output, words.output
    after = json.loads((folder / "dpo.json").read_text())
    assert [r["reply"] for r in after["replies"]] == [r["reply"] for r in before]
    assert after["axis"] == "words" and [r["value"] for r in after["replies"]] == [len(r["reply"].split()) for r in before]
    assert "words" in json.loads((folder / "summary.json").read_text())["line"]
    # New weights in dpo/model (trained again): only dpo answers again.
    from safetensors.torch import load_file, save_file

    weights = folder.parent / "dpo" / "model" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    retrained = CliRunner().invoke(cli, ["run", str(path), "--show", "0", "--no-report", "--set", "heldout.axis=words"])
    assert retrained.exit_code == 0 and "heldout: 1 written, 2 already done" in retrained.output, retrained.output
    longer = CliRunner().invoke(cli, ["run", str(path), "--show", "0", "--no-report",
                                      "--set", "heldout.params.max_tokens=9"])
    assert longer.exit_code == 0 and "heldout: 3 written, 0 already done" in longer.output, longer.output


def test_an_empty_prompts_file_is_refused_before_any_model_loads(tmp_path, tiny_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    config = {"name": "x", "output_dir": str(tmp_path / "out"), "stages": ["heldout"],
              "backend": {"spec": f"hf:{tiny_model}", "device": "cpu"}, "heldout": {"prompts": str(empty)}}
    path = tmp_path / "x.json.yaml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 2 and f"{empty}: no prompts" in result.output, result.output


def test_the_stage_says_which_trained_model_is_missing(tmp_path, tiny_model):
    config = {"name": "x", "output_dir": str(tmp_path / "out"), "stages": ["heldout"],
              "backend": {"spec": f"hf:{tiny_model}", "device": "cpu"},
              "heldout": {"prompts": str(heldout_prompts(tmp_path)), "models": ["base", "dpo"]}}
    path = tmp_path / "x.json.yaml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 2 and "dpo/model: no dpo model to measure" in result.output, result.output


def test_the_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_model):
    """bench/reshape.py's plumbing: every path, both axes, a handful of prompts (the text is noise)."""
    work = tmp_path / "work"
    sets = ["backend.device=cpu", "backend.batch_size=16", "critique.params.max_tokens=6",
            "sft.epochs=1", "dpo.epochs=1", "rm.epochs=1",
            "sft.max_length=128", "dpo.max_length=128", "rm.max_length=128", "sft.batch_size=2", "dpo.batch_size=2",
            "rm.batch_size=2", "sft.device=cpu", "dpo.device=cpu", "rm.device=cpu", "ppo.device=cpu", "ppo.steps=1",
            "ppo.batch_size=2", "ppo.mini_batch_size=2", "ppo.ppo_epochs=1", "ppo.response_length=6",
            "ppo.max_prompt_length=64", "ppo.eval_prompts=1", "ppo.eval_every=1", "ppo.checkpoint_every=1",
            "dpo.held_out=0.25", "rm.held_out=0.25", "heldout.device=cpu"]
    cmd = [sys.executable, str(REPO / "bench" / "reshape.py"), "--work", str(work), "--backend", f"hf:{tiny_model}",
           "--train-prompts", "4", "--heldout", "3", "--heldout-prompts", str(heldout_prompts(tmp_path)),
           "--max-tokens", "8"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (work / "reshape.log").read_text()
    results = json.loads((work / "reshape.json").read_text())
    assert results["paths"] == ["sft", "dpo", "rl"] and results["heldout_prompts"] == 3
    for axis, (down, up) in {"length": ("concise", "detailed"), "format": ("prose", "lists")}.items():
        out = results["axes"][axis]
        assert set(out["paths"]) == {"sft", "dpo", "rl"}
        for row in out["paths"].values():
            assert row[down]["kl"] >= 0 and row[up]["kl"] >= 0 and isinstance(row["met"], bool)
            assert 0 <= row[down]["cut"] <= 1 and 0 <= row[up]["cut"] <= 1
            assert len(row["ci"]) == 2
        assert "ratio" in out["paths"]["dpo"] if axis == "length" else "difference" in out["paths"]["dpo"]
        for name in (down, up):  # what the optimisers learnt from, read from the run's own files
            prefs = (work / name / "preferences.jsonl").read_text().splitlines()
            assert out["training_data"][name]["pairs"] == len(prefs) > 0
    # Each constitution's run trained every path's model from its own critique and judge passes.
    for name in ("concise", "detailed", "prose", "lists"):
        run = work / name
        assert (run / "revisions.jsonl").is_file() and (run / "preferences.jsonl").is_file()
        for model in ("sft", "dpo", "policy"):
            assert (run / model / "model" / "config.json").is_file()
        summary = json.loads((run / "heldout" / "summary.json").read_text())
        assert list(summary["models"]) == ["sft", "dpo", "ppo"]
        assert all(not math.isnan(m["mean"]) for m in summary["models"].values())
    assert "length (words): base model" in proc.stdout and "format (lists): base model" in proc.stdout


def test_the_benchmark_can_train_on_revision_pairs(tmp_path):
    """--pairs revisions: each final revision preferred over its first answer (p = 1), in the format DPO reads."""
    import importlib.util

    from factory.records import Preference, PreferencePair
    from factory.store import read_jsonl

    spec = importlib.util.spec_from_file_location("reshape_bench", REPO / "bench" / "reshape.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pairs = [PreferencePair(key="a", prompt="Name a tree.", chosen="Oak.", rejected="Well, an oak is one.", source="a"),
             PreferencePair(key="b", prompt="Say hi.", chosen="Hi.", rejected="Hi.", source="b")]  # unchanged: dropped
    (tmp_path / "critique_pairs.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    judged = Preference(key="j", prompt="Name a tree.", messages=[{"role": "user", "content": "Name a tree."}],
                        chosen="Well, an oak is one.", rejected="Oak.", p_chosen=0.6, margin=0.2, judge_model="m", source="j")
    (tmp_path / "preferences.jsonl").write_text(judged.model_dump_json() + "\n")
    revisions = read_jsonl(bench.preference_file(tmp_path, "revisions"), Preference)
    assert [(p.chosen, p.rejected, p.p_chosen, p.messages) for p in revisions] == [
        ("Oak.", "Well, an oak is one.", 1.0, [{"role": "user", "content": "Name a tree."}])]
    both = read_jsonl(bench.preference_file(tmp_path, "both"), Preference)
    assert [p.p_chosen for p in both] == [1.0, 0.6]

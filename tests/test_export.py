"""`factory export`: every format, written through the CLI from a run folder of real records, and read
back with the library that consumes it (datasets; TRL's documented columns; OpenRLHF's default keys
and its chat-template path, on the embedded model's real tokenizer). Left-out records are counted,
rounds are kept apart or together, outputs are never half-written, and the hub token never leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.export import EXPORT_FORMATS
from factory.export_output import replacing
from factory.records import ChatExample, Instance, Instruction, Preference, PreferencePair, Similar, Task
from factory.records import Reranked
from factory.store import Store

# -- a run folder of real records ---------------------------------------------------------------

Q1, A1 = "Name a primary colour.", "Red is a primary colour."
SYSTEM = {"role": "system", "content": "Be brief."}
MULTI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "A joke?"}]


def instruction(key: str, text: str, parse_error: str | None = None) -> Instruction:
    return Instruction(key=key, parse_error=parse_error, instruction=text, request_id="req", reply="raw reply",
                       most_similar=[Similar(instruction="seed", score=0.25)], avg_similarity=0.125, model="m")


def task(key: str, text: str, instances: list[tuple[str, str]], dropped: str | None = None,
         parse_error: str | None = None) -> Task:
    return Task(key=key, parse_error=parse_error, instruction_key="i-" + key, instruction=text,
                is_classification=False, p_classification=0.25, threshold=0.5,
                instances=[Instance(input=i, output=o) for i, o in instances], reply="raw", finish_reason="stop",
                dropped=dropped, model="m")


def chat(key: str, messages: list[dict], parse_error: str | None = None) -> ChatExample:
    return ChatExample(key=key, parse_error=parse_error, messages=messages, source="rev-" + key,
                       constitution="harmless", principles=["p1", "p2"])


def pref(key: str, messages: list[dict], chosen: str, rejected: str, p: float, **kw) -> Preference:
    return Preference(key=key, prompt=kw.pop("prompt", messages[-1]["content"]), messages=messages, chosen=chosen,
                      rejected=rejected, p_chosen=p, margin=2 * p - 1, principles=["p1"], judge_model="judge",
                      p_orders=[p, p], consistent=True, source="j-" + key, **kw)


def write(folder: Path, name: str, model, records) -> None:
    Store(folder / name, model).append(records)


def fill_round(folder: Path, r: int, tasks: bool = True) -> None:
    """One round's files. Round r's SFT and preference records differ by key and text; tasks do not
    (rounds >= 2 hold a copy of round 1's tasks)."""
    if tasks:
        write(folder, "instructions.jsonl", Instruction,
              [instruction("ins1", "Name a primary colour."), instruction("ins2", "", parse_error="no text")])
        write(folder, "tasks.jsonl", Task, [
            task("t1", "Name a primary colour.", [("", "Red."), ("Not red", "Blue.")]),
            task("t2", "Sort the list.", [("3 1 2", "1 2 3")]),
            task("t3", "Unanswerable.", [], dropped="no_instances"),
            task("t4", "Broken.", [], parse_error="bad reply"),
        ])
    write(folder, "sft.jsonl", ChatExample, [
        chat(f"s{r}a", [{"role": "user", "content": Q1}, {"role": "assistant", "content": f"{A1} (round {r})"}]),
        chat(f"s{r}b", [SYSTEM, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]),
        chat(f"s{r}c", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], parse_error="bad"),
    ])
    write(folder, "critique_pairs.jsonl", PreferencePair,
          [PreferencePair(key=f"c{r}", prompt=Q1, chosen="Red.", rejected="Pink.", source="rev")])
    write(folder, "preferences.jsonl", Preference, [
        pref(f"p{r}a", [{"role": "user", "content": Q1}], f"Red (round {r}).", "Pink.", 0.875),
        pref(f"p{r}b", MULTI, "Why did the chicken...", "No.", 0.75, prompt="Human: Hi\n\nAssistant: Hello!\n\n"
             "Human: A joke?", low_confidence=True),
        pref(f"p{r}c", [{"role": "user", "content": "q"}], "a", "b", 0.5, parse_error="bad judge reply"),
    ])
    write(folder, "rerank.jsonl", Reranked, [Reranked(
        key=f"r{r}", source="t1", prompt=Q1, messages=[{"role": "user", "content": Q1},
                                                       {"role": "assistant", "content": "Red."}],
        responses=["Pink.", "Red."], scores=[-0.5, 1.25], chosen=1, reward_model="rm", model="m")])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    folder = tmp_path / "demo"
    fill_round(folder, 1)
    return folder


@pytest.fixture
def rounds_dir(tmp_path) -> Path:
    folder = tmp_path / "loop"
    fill_round(folder / "round-1", 1)
    fill_round(folder / "round-2", 2)  # tasks copied: the same keys as round 1's
    fill_round(folder / "round-10", 10)  # sorted by number, not by name
    return folder


def export(*args) -> tuple[int, str]:
    """(exit code, stdout) on success, (exit code, stderr) on failure; datasets' progress bars go to stderr."""
    result = CliRunner().invoke(cli, ["export", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_json(path: Path, tmp_path: Path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))


# -- datasets: hf and parquet -------------------------------------------------------------------


def test_hf_folder_loads_with_one_split_per_kind_of_data(run_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "ds"
    code, output = export(run_dir, "--format", "hf", "-o", out)
    assert code == 0, output
    dd = load_from_disk(str(out))
    assert {k: v.num_rows for k, v in dd.items()} == {
        "instructions": 1, "tasks": 3, "sft": 2, "critique_pairs": 1, "preferences": 2, "rerank": 1}
    assert dd["tasks"].to_list() == [
        {"round": 1, "task": "t1", "instruction": "Name a primary colour.", "input": "", "output": "Red.",
         "is_classification": False, "p_classification": 0.25, "model": "m"},
        {"round": 1, "task": "t1", "instruction": "Name a primary colour.", "input": "Not red", "output": "Blue.",
         "is_classification": False, "p_classification": 0.25, "model": "m"},
        {"round": 1, "task": "t2", "instruction": "Sort the list.", "input": "3 1 2", "output": "1 2 3",
         "is_classification": False, "p_classification": 0.25, "model": "m"},
    ]
    assert dd["sft"][0] == {"round": 1, "key": "s1a", "messages": [
        {"role": "user", "content": Q1}, {"role": "assistant", "content": f"{A1} (round 1)"}],
        "constitution": "harmless", "principles": ["p1", "p2"], "source": "rev-s1a"}
    p = dd["preferences"][1]
    assert (p["key"], p["messages"], p["chosen"], p["rejected"]) == ("p1b", MULTI, "Why did the chicken...", "No.")
    assert (p["p_chosen"], p["margin"], p["p_orders"], p["low_confidence"], p["consistent"]) == (
        0.75, 0.5, [0.75, 0.75], True, True)
    assert dd["rerank"][0]["scores"] == [-0.5, 1.25] and dd["rerank"][0]["chosen"] == 1
    assert dd["instructions"][0] == {"round": 1, "key": "ins1", "instruction": "Name a primary colour.",
                                     "avg_similarity": 0.125, "model": "m"}
    # one summary line per split, with what was left out and why
    lines = output.splitlines()
    assert len(lines) == 6
    assert f"{out} (split tasks): 3 rows from tasks.jsonl; left out 1 dropped (no_instances) in tasks.jsonl, " \
           "1 parse_error in tasks.jsonl" in lines
    assert f"{out} (split sft): 2 rows from sft.jsonl; left out 1 parse_error in sft.jsonl" in lines


def test_parquet_files_load_with_the_parquet_builder(run_dir, tmp_path):
    from datasets import load_dataset

    out = tmp_path / "pq"
    code, output = export(run_dir, "--format", "parquet", "-o", out)
    assert code == 0, output
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"{s}.parquet" for s in
                           ["instructions", "tasks", "sft", "critique_pairs", "preferences", "rerank"])
    # one schema per file: each loads on its own (as each config of a hub export does)
    dd = {p.stem: load_dataset("parquet", data_files=str(p), split="train", cache_dir=str(tmp_path / "c"))
          for p in out.iterdir()}
    assert dd["preferences"].num_rows == 2 and dd["tasks"].num_rows == 3
    assert dd["preferences"]["p_chosen"] == [0.875, 0.75]
    assert dd["sft"]["messages"][0][1]["content"] == f"{A1} (round 1)"
    assert f"{out / 'preferences.parquet'}: 2 rows from preferences.jsonl; left out 1 parse_error in " \
           "preferences.jsonl" in output.splitlines()


# -- TRL ----------------------------------------------------------------------------------------


def test_trl_sft_is_the_conversational_language_modelling_type(run_dir, tmp_path):
    out = tmp_path / "sft.jsonl"
    code, output = export(run_dir, "--format", "trl-sft", "-o", out)
    assert code == 0, output
    ds = load_json(out, tmp_path)
    assert ds.column_names == ["messages"]  # TRL: {"messages": [{"role", "content"}, ...]}, nothing else
    assert ds["messages"] == [
        [{"role": "user", "content": Q1}, {"role": "assistant", "content": f"{A1} (round 1)"}],
        [SYSTEM, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
    ]
    assert output == f"{out}: 2 rows from sft.jsonl; left out 1 parse_error in sft.jsonl\n"


def test_trl_pairs_in_both_styles(run_dir, tmp_path):
    std, conv = tmp_path / "std.jsonl", tmp_path / "conv.jsonl"
    assert export(run_dir, "--format", "trl-pairs", "--style", "standard", "-o", std)[0] == 0
    assert export(run_dir, "--format", "trl-pairs", "-o", conv)[0] == 0  # conversational by default
    s = load_json(std, tmp_path)
    assert s.column_names == ["prompt", "chosen", "rejected"]  # TRL's standard preference type
    assert s[0] == {"prompt": Q1, "chosen": "Red (round 1).", "rejected": "Pink."}
    assert s[1]["prompt"] == "Human: Hi\n\nAssistant: Hello!\n\nHuman: A joke?"
    c = read_jsonl(conv)
    assert c == [  # TRL's conversational preference type: responses as one-message assistant turns
        {"prompt": [{"role": "user", "content": Q1}], "chosen": [{"role": "assistant", "content": "Red (round 1)."}],
         "rejected": [{"role": "assistant", "content": "Pink."}]},
        {"prompt": MULTI, "chosen": [{"role": "assistant", "content": "Why did the chicken..."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
    ]


# -- OpenRLHF -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(embedded_dir):
    """The embedded model's real tokenizer and chat template, which OpenRLHF's datasets would call."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def test_openrlhf_rm_rows_pass_its_chat_template_path(run_dir, tmp_path, smol_tokenizer):
    out = tmp_path / "rm.jsonl"
    code, output = export(run_dir, "--format", "openrlhf-rm", "-o", out)
    assert code == 0, output
    rows = read_jsonl(out)
    assert [sorted(r) for r in rows] == [["chosen", "margin", "rejected"]] * 2
    assert rows[1]["chosen"] == MULTI + [{"role": "assistant", "content": "Why did the chicken..."}]
    assert rows[1]["rejected"] == MULTI + [{"role": "assistant", "content": "No."}]
    assert [r["margin"] for r in rows] == [0.75, 0.5]
    # What openrlhf/datasets/reward_dataset.py does with its default keys (no --prompt_key) under
    # --apply_chat_template: each of chosen and rejected through the tokenizer's chat template, whole.
    tok = smol_tokenizer
    for r in load_json(out, tmp_path):
        chosen = tok.apply_chat_template(r["chosen"], tokenize=False)
        rejected = tok.apply_chat_template(r["rejected"], tokenize=False)
        assert r["chosen"][-1]["content"] in chosen and r["rejected"][-1]["content"] in rejected
        assert all(m["content"] in chosen for m in r["chosen"][:-1])


def test_openrlhf_rm_standard_is_the_whole_text(run_dir, tmp_path):
    out = tmp_path / "rm.jsonl"
    assert export(run_dir, "--format", "openrlhf-rm", "--style", "standard", "-o", out)[0] == 0
    rows = read_jsonl(out)
    assert rows[0] == {"chosen": f"Human: {Q1}\n\nAssistant: Red (round 1).",
                       "rejected": f"Human: {Q1}\n\nAssistant: Pink.", "margin": 0.75}
    assert rows[1]["rejected"] == "Human: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No."


def test_openrlhf_ppo_prompts_under_the_default_input_key(run_dir, tmp_path, smol_tokenizer):
    out = tmp_path / "ppo.jsonl"
    code, output = export(run_dir, "--format", "openrlhf-ppo", "-o", out)
    assert code == 0, output
    rows = read_jsonl(out)
    # factory's own prompt for a task: its instruction, then its first instance's input (if any)
    assert rows == [{"input": "Name a primary colour."}, {"input": "Sort the list.\n\n3 1 2"}]
    assert output == (f"{out}: 2 rows from tasks.jsonl; left out 1 dropped (no_instances) in tasks.jsonl, "
                      "1 parse_error in tasks.jsonl\n")
    # prompts_dataset.py under --apply_chat_template: a string becomes one user turn
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": rows[1]["input"]}], tokenize=False,
                                   add_generation_prompt=True)
    assert "Sort the list.\n\n3 1 2" in text


# -- Alpaca -------------------------------------------------------------------------------------


ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Name a primary colour.", "input": "Not red", "output": "Blue."},
    {"instruction": "Sort the list.", "input": "3 1 2", "output": "1 2 3"},
    {"instruction": Q1, "input": "", "output": f"{A1} (round 1)"},
]


@pytest.mark.parametrize("name", ["alpaca.json", "alpaca.jsonl"])
def test_alpaca_rows_from_task_instances_and_single_turn_sft(run_dir, tmp_path, name):
    out = tmp_path / name
    code, output = export(run_dir, "--format", "alpaca", "-o", out)
    assert code == 0, output
    if name.endswith(".json"):
        assert json.loads(out.read_text(encoding="utf-8")) == ALPACA  # one array, as alpaca_data.json
    else:
        assert read_jsonl(out) == ALPACA
    assert load_json(out, tmp_path).to_list() == ALPACA
    assert output == (f"{out}: 4 rows from tasks.jsonl + sft.jsonl; left out 1 not single-turn in sft.jsonl, "
                      "1 parse_error in sft.jsonl, 1 dropped (no_instances) in tasks.jsonl, 1 parse_error in "
                      "tasks.jsonl\n")


# -- rounds ------------------------------------------------------------------------------------


def test_all_rounds_together_each_row_with_its_round(rounds_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "ds"
    code, output = export(rounds_dir, "--format", "hf", "-o", out)
    assert code == 0, output
    dd = load_from_disk(str(out))
    assert dd["sft"]["round"] == [1, 1, 2, 2, 10, 10]
    assert dd["sft"]["key"] == ["s1a", "s1b", "s2a", "s2b", "s10a", "s10b"]
    assert dd["preferences"]["chosen"][::2] == ["Red (round 1).", "Red (round 2).", "Red (round 10)."]
    # every round holds the same tasks: exported once, as round 1's
    assert dd["tasks"].num_rows == 3 and set(dd["tasks"]["round"]) == {1}
    assert f"{out} (split sft): 6 rows from sft.jsonl, rounds 1, 2, 10; left out 3 parse_error in sft.jsonl" \
        in output.splitlines()


def test_one_round(rounds_dir, tmp_path):
    out = tmp_path / "sft.jsonl"
    code, output = export(rounds_dir, "--format", "trl-sft", "--round", 2, "-o", out)
    assert code == 0, output
    assert [r["messages"][-1]["content"] for r in read_jsonl(out)] == [f"{A1} (round 2)", "Because."]
    assert output == f"{out}: 2 rows from sft.jsonl, round 2; left out 1 parse_error in sft.jsonl\n"
    pairs = tmp_path / "pairs.jsonl"
    assert export(rounds_dir, "--format", "trl-pairs", "--style", "standard", "-o", pairs)[0] == 0
    assert [r["chosen"] for r in read_jsonl(pairs)][::2] == ["Red (round 1).", "Red (round 2).", "Red (round 10)."]
    assert "round" not in read_jsonl(pairs)[0]  # TRL's columns only


def test_a_round_the_run_lacks_is_refused(rounds_dir, run_dir, tmp_path):
    code, output = export(rounds_dir, "--format", "trl-sft", "--round", 3, "-o", tmp_path / "x.jsonl")
    assert code == 2 and "no round 3; its rounds are 1, 2, 10" in output
    code, output = export(run_dir, "--format", "trl-sft", "--round", 2, "-o", tmp_path / "x.jsonl")
    assert code == 2 and "no round 2; its rounds are 1" in output
    assert not (tmp_path / "x.jsonl").exists()
    assert export(run_dir, "--format", "trl-sft", "--round", 1, "-o", tmp_path / "x.jsonl")[0] == 0


# -- refusing, overwriting, never half-written ---------------------------------------------------


def test_an_existing_output_needs_force(run_dir, tmp_path):
    out = tmp_path / "sft.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    code, output = export(run_dir, "--format", "trl-sft", "-o", out)
    assert code == 2 and f"{out} exists; pass --force to overwrite it" in output
    assert out.read_text(encoding="utf-8") == "keep me\n"
    assert export(run_dir, "--format", "trl-sft", "-o", out, "--force")[0] == 0
    assert len(read_jsonl(out)) == 2


def test_force_replaces_a_folder_whole(run_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "ds"
    out.mkdir()
    (out / "stale.txt").write_text("old", encoding="utf-8")
    assert export(run_dir, "--format", "hf", "-o", out)[0] == 2
    assert export(run_dir, "--format", "hf", "-o", out, "--force")[0] == 0
    assert not (out / "stale.txt").exists()
    assert load_from_disk(str(out))["sft"].num_rows == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


@pytest.mark.parametrize("target", ["sft.jsonl", ".", "..", "rm"])
def test_the_run_itself_is_never_overwritten(run_dir, target):
    (run_dir / "rm").mkdir()
    before = (run_dir / "sft.jsonl").read_bytes()
    code, output = export(run_dir, "--format", "trl-sft", "-o", run_dir / target, "--force")
    assert code == 2 and "choose another output" in output
    assert (run_dir / "sft.jsonl").read_bytes() == before and (run_dir / "rm").is_dir()


def test_another_rounds_files_are_protected_too(rounds_dir):
    before = (rounds_dir / "round-1" / "sft.jsonl").read_bytes()
    code, output = export(rounds_dir, "--format", "trl-sft", "--round", 2, "-o", rounds_dir / "round-1" / "sft.jsonl",
                          "--force")
    assert code == 2 and "is the run's own sft.jsonl" in output
    assert (rounds_dir / "round-1" / "sft.jsonl").read_bytes() == before


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
        (out / "a").write_text("old", encoding="utf-8")
    else:
        out.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(out) as tmp:
            if kind == "folder":
                tmp.mkdir()
                (tmp / "a").write_text("half", encoding="utf-8")
            else:
                tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("disk full")
    assert (out / "a" if kind == "folder" else out).read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_fresh_output_appears_only_at_the_end(tmp_path):
    out = tmp_path / "new" / "out.jsonl"
    with replacing(out) as tmp:
        tmp.write_text("{}\n", encoding="utf-8")
        assert not out.exists()
    assert out.read_text(encoding="utf-8") == "{}\n"


# -- bad requests ------------------------------------------------------------------------------


def test_bad_requests_exit_2_with_a_message(run_dir, tmp_path):
    out = tmp_path / "o"
    cases = [
        (["--format", "hf", "-o", out, "--style", "standard"], "--style applies to trl-pairs and openrlhf-rm"),
        (["--format", "trl-sft"], "pass -o/--output"),
        (["--format", "hub", "-o", out, "--repo", "me/data"], "leave out -o"),
        (["--format", "hub"], "pass --repo OWNER/NAME"),
        (["--format", "alpaca", "-o", out, "--repo", "me/data"], "--format hub only"),
    ]
    for args, message in cases:
        code, output = export(run_dir, *args)
        assert code == 2 and message in output, (args, output)
    code, output = export(tmp_path / "nope", "--format", "hf", "-o", out)
    assert code == 2 and "no such run folder" in output
    empty = tmp_path / "outputs" / "empty"
    empty.mkdir(parents=True)
    code, output = export(empty, "--format", "trl-pairs", "-o", out)
    assert code == 2 and "nothing to export as trl-pairs: no usable records in preferences.jsonl" in output
    code, output = export(empty, "--format", "parquet", "-o", out)
    assert code == 2 and "nothing to export" in output
    assert not out.exists()


def test_the_cli_offers_every_format():
    command = cli.commands["export"]
    fmt = next(p for p in command.params if p.name == "fmt")
    assert tuple(fmt.type.choices) == EXPORT_FORMATS


# -- hub: the token --------------------------------------------------------------------------------


def hub_cli(run_dir: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The real command in a fresh process, so huggingface_hub reads this environment (HF_HOME: no stored login)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")}
    clean.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run(
        [sys.executable, "-c", "from factory.cli import main; main()", "export", str(run_dir), "--format", "hub",
         "--repo", "someone/factory-data"], env=clean, capture_output=True, text=True, timeout=120)


def test_hub_without_a_token_exits_2_and_says_how_to_get_one(run_dir, tmp_path):
    done = hub_cli(run_dir, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no Hugging Face token; set HF_TOKEN or log in with `hf auth login`" in done.stderr
    assert "Traceback" not in done.stderr


class EchoTokenHandler(BaseHTTPRequestHandler):
    """A hostile hub: refuses every request with an error message that quotes the request's token."""

    def _refuse(self):
        body = json.dumps({"error": f"invalid credentials: {self.headers.get('Authorization')}"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Message", f"invalid credentials: {self.headers.get('Authorization')}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["refuses connections", "quotes the token"])
def test_hub_never_shows_the_token(run_dir, tmp_path, server):
    from tests.conftest import free_port

    planted = "hf_PlantedSecretValue0123456789"
    if server == "refuses connections":
        httpd = None
        port = free_port()  # nothing listens: the push fails at once
    else:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), EchoTokenHandler)
        port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        done = hub_cli(run_dir, tmp_path, HF_TOKEN=planted, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    finally:
        if httpd:
            httpd.shutdown()
            httpd.server_close()
    assert done.returncode == 2, done.stderr
    assert "hub: pushing instructions to someone/factory-data failed: " in done.stderr
    if httpd:
        assert "invalid credentials" in done.stderr  # the server's message is shown...
    assert planted not in done.stdout + done.stderr  # ...but never the token
    assert "Traceback" not in done.stderr

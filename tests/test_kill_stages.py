"""Every stage and trainer, SIGKILLed at random moments and run again, ends as an uninterrupted run.

For each stage: one uninterrupted reference run, then runs of one series (a fresh run folder)
each SIGKILLed at a random moment until 10 kills are made, then one run to completion. After it:

- every JSONL file of the run folder ends with a newline, every line reads back (``read_jsonl`` with
  its record type, its StoreWarnings turned into errors), no key appears twice, and each file's
  set of keys is the reference run's (none lost, none extra);
- no model call whose batch was written was made again (``repeated_written``, over the call log
  ``kill_driver.py`` writes before every backend call);
- a trainer's metrics hold every step exactly once, its final model exists, and its weights are
  the reference run's, within the tolerance its own resume test uses.

The kill moment. Each run is a child of ``kill_driver.py --serve`` (a fork server that has paid for
the imports once); the moment is drawn after the child's ``start`` line (its backend is loaded, the
stage function is about to run), uniformly over [0, setup + min(remaining + 0.5, ahead) x unit],
where unit is the reference run's time per batch (or step) at its steady pace, setup what its first
batch took beyond that, remaining the batches this series has left, and ahead max(2.5, 3 x setup /
unit). Drawing over the whole rest of a run would halve the work left at each kill, and every kill
after the third would fall in the last batch; this window spreads the kills over every batch of the
file, before, inside and after its write, and keeps most of them out of the set-up. If a series
finishes before its 10th kill, a new series starts in a fresh folder (its checks run too).

Which model: the tiny random Llama (conftest ``tiny_model``) for every stage whose records do not
depend on what the text says (generate, instances, critique, judge, rerank: each item gets its
record whatever the reply, and its key is a hash of its inputs), and the real embedded model for
bootstrap, where what is written (which instructions are accepted, hence which prompts come next)
depends on parsing real numbered lists. Replay: ``KILL_TEST_SEED=<seed printed by the test>``;
``KILL_TEST_SPAWN=1`` runs each run in a fresh interpreter instead of a fork (~8x slower).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from kill_driver import checkpoint_step, complete_bytes, request_hash

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("kill_driver.py")
KILLS = 10
MAX_RUNS = 60  # a stage that never gets done (or never gets killed) fails instead of looping


# -- the "no repeated call for a written item" check --------------------------------------------


def read_log(path: Path) -> list[dict]:
    """The call log's events, complete lines only (a kill can tear its last line)."""
    data = path.read_bytes() if path.is_file() else b""
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]]


def repeated_written(events: list[dict], exempt: frozenset[str] = frozenset()) -> list[tuple[str, int, int]]:
    """(request hash, index of the call that had it written, index of the later call that asked it
    again) for every request asked again after its result was written.

    A call logged with ``complete`` = c had its batch written once a later event (a call of the
    same run, or the next run's start line) sees the primary file longer than c: the stage writes
    a batch after its calls and before the next batch's, in whole lines. Calls after the last
    growth were lost to a kill and may be asked again. ``exempt``: requests a stage makes on every
    run by design, not for an item (instances' calibration on the seed tasks).
    """
    flagged = []
    for i, call in enumerate(events):
        if call["ev"] != "call":
            continue
        grown = next((j for j in range(i + 1, len(events)) if events[j]["complete"] > call["complete"]), None)
        if grown is None:
            continue
        written = set(call["hashes"]) - exempt
        for j in range(grown, len(events)):
            if events[j]["ev"] == "call":
                flagged += [(h, i, j) for h in sorted(written & set(events[j]["hashes"]))]
    return flagged


def _call(pid: int, complete: int, *hashes: str) -> dict:
    return {"ev": "call", "pid": pid, "t": 0.0, "complete": complete, "method": "generate", "hashes": list(hashes)}


def _start(pid: int, complete: int) -> dict:
    return {"ev": "start", "pid": pid, "t": 0.0, "complete": complete}


def test_checker_flags_a_written_item_asked_again():
    a, b, c = (request_hash([{"role": "user", "content": x}]) for x in "abc")
    # Run 1 asks a (written: the file grew to 100), then b, and is killed before b's write.
    # Run 2 starts at 100 and asks b again (allowed: lost), then a again (a bug).
    log = [_start(1, 0), _call(1, 0, a), _call(1, 100, b), _start(2, 100), _call(2, 100, b), _call(2, 100, a)]
    assert repeated_written(log) == [(a, 1, 5)]
    assert repeated_written(log[:5]) == []  # the lost call repeated, nothing else: fine
    # The growth can show only at the next run's start: a killed run's last batch written after its calls.
    log = [_start(1, 0), _call(1, 0, a, c), _start(2, 80), _call(2, 80, c)]
    assert repeated_written(log) == [(c, 1, 3)]
    assert repeated_written(log, exempt=frozenset({c})) == []
    # Within one run too: a written item asked again later in the same run.
    log = [_start(1, 0), _call(1, 0, a), _call(1, 50, b), _call(1, 90, a)]
    assert repeated_written(log) == [(a, 1, 3)]


def test_checker_on_a_real_log_file(tmp_path):
    """The checker reads what the driver's CallLog writes, and drops a torn last line."""
    from kill_driver import CallLog

    out, log_path = tmp_path / "out.jsonl", tmp_path / "calls.log"
    log = CallLog(log_path, out)
    log.event("start")
    log.event("call", method="generate", hashes=["h1"])
    out.write_bytes(b'{"key": "k1"}\n{"key": "k2"')  # one whole line, one torn
    log.event("call", method="generate", hashes=["h1"])
    with open(log_path, "ab") as f:
        f.write(b'{"ev": "call", "pid"')  # a kill inside the log's own write
    events = read_log(log_path)
    assert [e["complete"] for e in events] == [0, 0, 14]
    assert repeated_written(events) == [("h1", 1, 2)]


# -- the fork server ------------------------------------------------------------------------------


class Server:
    """``kill_driver.py --serve``: one request per run, answered when the run has ended."""

    def __init__(self, spawn: bool = False):
        env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.spawn = spawn
        # Its imports (seconds) overlap the fixtures that run next; run() waits for its ready line.
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.ready = False

    def run(self, stage: str, config: Path, run_dir: Path, call_log: Path, kill_after_s: float | None) -> dict:
        if not self.ready:
            line = self.proc.stdout.readline()
            assert line and "ready" in json.loads(line), "the fork server died at start-up"
            self.ready = True
        out = run_dir.with_name(run_dir.name + ".out")
        req = {"stage": stage, "config": str(config), "run_dir": str(run_dir), "call_log": str(call_log),
               "out": str(out), "kill_after_s": kill_after_s, "spawn": self.spawn}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        result = json.loads(line)
        if not result["killed"] and result["code"] != 0:
            tail = out.read_text(encoding="utf-8", errors="replace")[-3000:] if out.is_file() else ""
            raise AssertionError(f"{stage} run in {run_dir} exited with {result['code']}:\n{tail}")
        return result

    def close(self) -> None:
        self.proc.stdin.close()  # the server's loop ends at end of input
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(embedded_dir):
    srv = Server(spawn=os.environ.get("KILL_TEST_SPAWN") == "1")  # 1: a fresh interpreter per run
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(os.environ.get("KILL_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nkill test seed {value} (replay with KILL_TEST_SEED={value})")
    return value


def stage_rng(seed: int, stage: str) -> random.Random:
    """One generator per stage, so replaying one test draws what it drew in the whole file."""
    return random.Random(f"{seed}:{stage}")


# -- what a run folder holds ----------------------------------------------------------------------


def record_types() -> dict[str, type]:
    """The record type of every store file a stage writes, by file name."""
    from factory.layout import RunLayout
    from factory.records import (BootstrapRequest, ChatExample, Failure, Generation, Instruction, Judgment,
                                 Preference, PreferencePair, Reranked, Revision, Task)

    layout = RunLayout(Path())
    return {
        layout.generations.name: Generation, layout.bootstrap_requests.name: BootstrapRequest,
        layout.instructions.name: Instruction, layout.tasks.name: Task, layout.revisions.name: Revision,
        layout.sft_data.name: ChatExample, layout.critique_pairs.name: PreferencePair,
        layout.judgments.name: Judgment, layout.preferences.name: Preference, layout.rerank.name: Reranked,
        layout.failures.name: Failure,
    }


def folder_state(run_dir: Path) -> dict[str, dict]:
    """Per JSONL file: its keys (store files) or line count (exports), after checking that it ends
    with a newline, that every line reads back, and that no key repeats."""
    from factory.store import StoreWarning, read_jsonl

    types = record_types()
    state = {}
    for path in sorted(run_dir.rglob("*.jsonl")):
        name = str(path.relative_to(run_dir))
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path}: a torn last line was left in the finished run"
        if path.name in types:
            with warnings.catch_warnings():
                warnings.simplefilter("error", StoreWarning)  # a torn line or a repeated key fails
                records = read_jsonl(path, types[path.name])
            keys = [r.key for r in records]
            dups = len(keys) - len(set(keys))
            assert dups == 0, f"{path}: {dups} keys written twice"
            state[name] = {"keys": set(keys)}
        else:
            rows = [json.loads(line) for line in data.split(b"\n")[:-1]]
            state[name] = {"lines": len(rows)}
    return state


def compare_folders(series: Path, reference: Path) -> tuple[int, int]:
    """Assert the series folder's JSONL files hold the reference's items; (items, lost)."""
    got, want = folder_state(series), folder_state(reference)
    assert got.keys() == want.keys(), f"files differ: {sorted(got)} vs {sorted(want)}"
    items = lost = 0
    for name in want:
        if "keys" in want[name]:
            missing, extra = want[name]["keys"] - got[name]["keys"], got[name]["keys"] - want[name]["keys"]
            assert not missing and not extra, f"{name}: {len(missing)} keys lost, {len(extra)} not in the reference"
            items += len(want[name]["keys"])
            lost += len(missing)
        else:
            assert got[name] == want[name], name
    return items, lost


# -- the kill series ------------------------------------------------------------------------------


def timing(events: list[dict]) -> tuple[float, float, int]:
    """(set-up s, s per unit, units) of an uninterrupted run's log. A unit is a batch (a data stage:
    the file grows once per batch) or a trainer step; the steady pace between the first and the
    last unit is the unit's time, and whatever the first took beyond it is set-up (loading a
    reward model, instances' calibration)."""
    start = next(e for e in events if e["ev"] == "start")
    if any(e["ev"] == "step" for e in events):
        marks = [e["t"] for e in events if e["ev"] == "step" and e["kind"] == "train"]
    else:  # the first event of a run that sees each growth of the primary file
        marks, last = [], start["complete"]
        for e in events:
            if e["complete"] > last:
                marks.append(e["t"])
                last = e["complete"]
    if not marks:
        return events[-1]["t"] - start["t"], 0.0, 0
    unit = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else marks[0] - start["t"]
    return max(0.0, marks[0] - start["t"] - unit), unit, len(marks)


def worked(events: list[dict]) -> list[bool]:
    """For each run in a log: whether it made a model call (or a training step) before it ended."""
    runs: list[bool] = []
    for e in events:
        if e["ev"] == "start":
            runs.append(False)
        elif e["ev"] == "call" or (e["ev"] == "step" and e["kind"] == "train"):
            runs[-1] = True
    return runs


def kill_series(server: Server, stage: str, config: Path, folder: Path, rng: random.Random,
                progress, prepare=None) -> dict:
    """The reference run, then series of killed runs until KILLS kills, each series run to the end;
    figures. ``prepare(run_dir)`` gives a fresh run folder its inputs (a previous stage's output)."""
    t0 = time.monotonic()
    ref_dir, ref_log = folder / "reference", folder / "reference.log"
    if prepare is not None:
        prepare(ref_dir)
    server.run(stage, config, ref_dir, ref_log, None)
    setup, unit, units = timing(read_log(ref_log))
    figures = {"kills": 0, "runs": 1, "series": 0, "torn": 0, "progressed": 0, "logs": [], "dirs": []}
    while figures["kills"] < KILLS:
        figures["series"] += 1
        run_dir, log = folder / f"series-{figures['series']}", folder / f"series-{figures['series']}.log"
        figures["dirs"].append(run_dir)
        if prepare is not None:
            prepare(run_dir)
        figures["logs"].append(log)
        while True:
            assert figures["runs"] < MAX_RUNS, f"{stage}: {MAX_RUNS} runs and still not done"
            before = progress(run_dir, ref_dir)
            delay = None
            if figures["kills"] < KILLS:
                remaining = max(0.0, 1.0 - before) * units
                # Three times as much work time as set-up time in the window at least, so that a stage
                # whose set-up is long next to its units (a trainer; a restart also loads its
                # checkpoint) is not killed mostly in set-up.
                ahead = max(2.5, 3 * setup / unit) if unit else 2.5
                delay = rng.uniform(0.0, setup + min(remaining + 0.5, ahead) * unit)
            result = server.run(stage, config, run_dir, log, delay)
            figures["runs"] += 1
            if not result["killed"]:
                break  # finished (the server raised if it failed)
            figures["kills"] += 1
            figures["torn"] += torn(run_dir)
            figures["progressed"] += progress(run_dir, ref_dir) > before
    figures["seconds"] = time.monotonic() - t0
    # Temporary files a killed run left behind in a finished run folder (reported, not an error:
    # nothing reads them, but nothing removes them either).
    figures["leftover"] = sorted(str(p.relative_to(folder)) for d in figures["dirs"] for p in d.rglob("*")
                                 if ".tmp" in p.name or p.name.endswith(".old"))
    if figures["leftover"]:
        print(f"\n{stage}: left behind by killed runs: {figures['leftover']}")
    # Killed runs that had begun their real work (a call, a step) rather than still setting up.
    figures["in_work"] = sum(sum(ran[:-1]) for ran in map(worked, map(read_log, figures["logs"])))
    figures["setup_s"], figures["unit_s"], figures["units"] = setup, unit, units
    return figures


def data_progress(primary: str):
    def progress(run_dir: Path, ref_dir: Path) -> float:
        return complete_bytes(run_dir / primary) / max(1, complete_bytes(ref_dir / primary))
    return progress


def torn(run_dir: Path) -> int:
    """Whether the kill left a torn line at the end of a JSONL file (it landed inside a write)."""
    return int(any(p.stat().st_size > complete_bytes(p) for p in run_dir.rglob("*.jsonl")))


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def base_config(stage: str, spec: str, batch_size: int) -> dict:
    return {"name": "run", "output_dir": "unused", "stages": [stage],
            "backend": {"spec": spec, "batch_size": batch_size, "device": "cpu"}}


# -- data stages ----------------------------------------------------------------------------------


def run_data_stage(server, seed, stage: str, config: dict, folder: Path, exempt: frozenset[str] = frozenset(),
                   inputs=None, same_records: bool = False) -> dict:
    """The kill series of a data stage, with every check; prints and returns its figures.

    ``same_records``: the killed series must write the very records of the uninterrupted run, texts
    included (batches are cut at fixed offsets of the item list and seeded by them)."""
    from kill_driver import primary_file
    from factory.config import load_config

    config_path = write_config(folder, config)
    cfg = load_config(config_path)
    primary = primary_file(stage, cfg).name
    figures = kill_series(server, stage, config_path, folder, stage_rng(seed, stage), data_progress(primary), inputs)
    lost, repeated, calls = 0, [], 0
    for run_dir, log in zip(figures["dirs"], figures["logs"]):
        lost += compare_folders(run_dir, folder / "reference")[1]
        events = read_log(log)
        calls += sum(e["ev"] == "call" for e in events)
        repeated += repeated_written(events, exempt)
    ref_keys = folder_state(folder / "reference")[primary]["keys"]
    print(f"\nFIGURES kill: stage={stage} kills={figures['kills']} runs={figures['runs']} series={figures['series']} "
          f"calls={calls} repeated_written={len(repeated)} items={len(ref_keys)} lost={lost} "
          f"torn={figures['torn']} leftover={len(figures['leftover'])} in_work={figures['in_work']} "
          f"progressed={figures['progressed']} unit_s={figures['unit_s']:.2f} setup_s={figures['setup_s']:.2f} "
          f"units={figures['units']} seconds={figures['seconds']:.1f}")
    assert not repeated, f"{stage}: requests asked again after their result was written: {repeated[:5]}"
    assert figures["kills"] >= KILLS and lost == 0
    if same_records:
        from factory.store import read_jsonl

        def records(run_dir: Path) -> dict:
            return {r.key: r.model_dump() for r in read_jsonl(run_dir / primary, record_types()[primary])}

        want = records(folder / "reference")
        for run_dir in figures["dirs"]:
            got = records(run_dir)
            differ = [k for k in want if got[k] != want[k]]
            assert not differ, f"{stage}: {len(differ)} of {len(want)} records differ from the uninterrupted run's"
    return figures


def seeded_inputs(name: str, rows: list[dict]):
    """A function that writes ``rows`` as ``name`` into a fresh run folder."""
    def write(run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return write


QUESTIONS = [
    "How do I keep basil alive on a windowsill?", "What is the difference between weather and climate?",
    "Suggest a name for a tabby kitten.", "Explain what a prime number is to a child.",
    "How long should I boil an egg for a runny yolk?", "Why do onions make people cry?",
    "Give me three tips for a job interview.", "What does a router do in a home network?",
    "How can I fall asleep faster?", "Write a two-line poem about autumn.",
    "What is a good first programming language?", "How do bees make honey?",
    "Why is the ocean salty?", "Recommend a board game for four people.",
    "How do I convert Celsius to Fahrenheit?", "What causes hiccups?",
]


def prompts_file(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(QUESTIONS)),
                    encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_generate(server, seed, tmp_path, tiny_model):
    config = base_config("generate", f"hf:{tiny_model}", 2)
    config["generate"] = {"seeds": [str(ROOT / "seeds" / "seed_tasks.jsonl")], "limit": 32, "params": {"max_tokens": 8}}
    run_data_stage(server, seed, "generate", config, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bootstrap(server, seed, tmp_path):
    config = base_config("bootstrap", "hf:embedded", 1)
    config["bootstrap"] = {"seeds": [str(ROOT / "seeds" / "seed_tasks.jsonl")], "target": 5, "requests_per_batch": 1,
                           "human_examples": 3, "machine_examples": 1, "params": {"max_tokens": 24}}
    figures = run_data_stage(server, seed, "bootstrap", config, tmp_path)
    # More than the same keys: the same prompts and replies, request by request. A resumed run
    # rebuilds the pool by replaying the written requests, request i's examples are drawn with a
    # seed made of i, a batch's sampling seed is bootstrap.seed + its first index, and batches are
    # written whole, so a lost batch is asked again exactly as the uninterrupted run asked it.
    from factory.layout import RunLayout
    from factory.records import BootstrapRequest
    from factory.store import read_jsonl

    def requests(run_dir: Path) -> dict:
        return {r.key: (r.messages, r.reply) for r in read_jsonl(RunLayout(run_dir).bootstrap_requests,
                                                                  BootstrapRequest)}

    assert all(requests(d) == requests(tmp_path / "reference") for d in figures["dirs"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_instances(server, seed, tmp_path, tiny_model):
    from factory.instances import classify_prompt
    from factory.records import Instruction
    from factory.seeds import load_seeds

    seeds = ROOT / "seeds" / "seed_tasks.jsonl"
    config = base_config("instances", f"hf:{tiny_model}", 2)
    config["bootstrap"] = {"seeds": [str(seeds)]}
    config["instances"] = {"calibration_size": 2, "few_shot": 1, "params": {"max_tokens": 8}}
    rows = [Instruction(key=hashlib.sha256(q.encode()).hexdigest()[:16], instruction=q, request_id="hand-made",
                        reply="", most_similar=[], avg_similarity=0.0, model="hand-made").model_dump(mode="json")
            for q in QUESTIONS]
    # Calibration scores seed tasks on every run that has work left: by design, not for an item.
    exempt = frozenset(request_hash(classify_prompt(t.instruction)) for t in load_seeds(seeds))
    run_data_stage(server, seed, "instances", config, tmp_path, exempt, seeded_inputs("instructions.jsonl", rows),
                   same_records=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_critique(server, seed, tmp_path, tiny_model):
    config = base_config("critique", f"hf:{tiny_model}", 2)
    config["critique"] = {"constitution": str(ROOT / "principles" / "harmless.yaml"), "prompts": str(prompts_file(tmp_path)),
                          "few_shot": 0, "skip_unchanged": True, "pairs": True, "params": {"max_tokens": 8}}
    run_data_stage(server, seed, "critique", config, tmp_path, same_records=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_judge(server, seed, tmp_path, tiny_model):
    responses = tmp_path / "responses.jsonl"
    tmp_path.mkdir(exist_ok=True)
    responses.write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": q, "responses": [f"A careful answer to: {q}", "No idea, sorry."]}) + "\n"
        for i, q in enumerate(QUESTIONS)), encoding="utf-8")
    # batch_size 2: one item (its two orders) per batch, so every run scores an item in the same
    # batch as the reference did and its chosen/rejected (part of the pair's key) cannot flip.
    config = base_config("judge", f"hf:{tiny_model}", 2)
    config["judge"] = {"constitution": str(ROOT / "principles" / "harmless.yaml"), "candidates": "file",
                       "responses": str(responses), "principles": 1}
    run_data_stage(server, seed, "judge", config, tmp_path, same_records=True)


@pytest.fixture(scope="module")
def reward_dir(tiny_model, tmp_path_factory) -> Path:
    """A reward-model folder (scalar head on the tiny Llama, untrained): what rerank and PPO read."""
    import torch

    from factory.train.models import ScalarModel, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-rm")
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    ScalarModel.from_pretrained(tiny_model, torch.device("cpu"), tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rerank(server, seed, tmp_path, tiny_model, reward_dir):
    config = base_config("rerank", f"hf:{tiny_model}", 2)
    config["rerank"] = {"prompts": str(prompts_file(tmp_path)), "reward_model": str(reward_dir), "n": 2,
                        "device": "cpu", "max_length": 64, "params": {"max_tokens": 8}}
    run_data_stage(server, seed, "rerank", config, tmp_path, same_records=True)


# -- trainers -------------------------------------------------------------------------------------


def metric_rows(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path}: a torn last line was left in the finished run"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def untimed(row: dict) -> tuple:
    """A metrics row without its timings, comparable between two runs."""
    return tuple(sorted((k, v) for k, v in row.items() if k != "elapsed_s" and not k.startswith("time/")))


def steps_redone(events: list[dict]) -> tuple[list[tuple[int, int]], list[int]]:
    """From a series' log: (run, step) of every train step a run made although the checkpoint it
    started from already held it (a repeat of durable work), and for each restart the number of
    steps the previous run made past that checkpoint (lost to the kill, made again)."""
    runs: list[dict] = []
    for e in events:
        if e["ev"] == "start":
            runs.append({"ckpt": e["ckpt_step"], "steps": []})
        elif e["ev"] == "step" and e["kind"] == "train":
            runs[-1]["steps"].append(e["step"])
    repeated = [(r, s) for r, run in enumerate(runs) for s in run["steps"] if s <= run["ckpt"]]
    lost = [sum(s > nxt["ckpt"] for s in run["steps"]) for run, nxt in zip(runs, runs[1:])]
    return repeated, lost


def run_trainer(server, seed, stage: str, config: dict, folder: Path, tolerance: dict, weights: list[str],
                prepare=None) -> dict:
    """The kill series of a trainer, with every check; prints and returns its figures."""
    from safetensors.torch import load_file
    import torch

    config_path = write_config(folder, config)
    output = config[stage].get("output", {"sft": "sft", "rm": "rm", "ppo": "policy", "dpo": "dpo"}[stage])
    ref_dir = folder / "reference"
    # The series needs the step count first: the reference run's own (its last checkpoint's).
    holder = {}

    def progress(run_dir: Path, ref: Path) -> float:
        if "total" not in holder:
            holder["total"] = checkpoint_step(ref / output)
        return checkpoint_step(run_dir / output) / holder["total"]

    figures = kill_series(server, stage, config_path, folder, stage_rng(seed, stage), progress, prepare)
    ref_rows = metric_rows(ref_dir / output / "metrics.jsonl")
    total = holder.get("total") or checkpoint_step(ref_dir / output)
    key = "objective/kl" if stage == "ppo" else "train/loss"
    assert [r["step"] for r in ref_rows if key in r] == list(range(1, total + 1))
    repeated, lost_per_kill, max_diff = [], [], 0.0
    for run_dir, log in zip(figures["dirs"], figures["logs"]):
        rows = metric_rows(run_dir / output / "metrics.jsonl")
        steps = [r["step"] for r in rows if key in r]
        assert steps == list(range(1, total + 1)), f"{stage}: train steps in metrics.jsonl: {steps}"
        evals, ref_evals = (sorted(map(untimed, (r for r in rs if key not in r))) for rs in (rows, ref_rows))
        assert [[k for k, _ in r] for r in evals] == [[k for k, _ in r] for r in ref_evals], f"{stage}: eval rows"
        for got, want in zip(evals, ref_evals):
            assert dict(got) == pytest.approx(dict(want), rel=tolerance["rtol"], abs=tolerance["atol"]), stage
        if stage == "ppo":  # every held-out prompt's greedy sample once per eval, as in the reference
            samples, ref_samples = ([(r["step"], r["prompt"], r["response"]) for r in metric_rows(d / "samples.jsonl")]
                                    for d in (run_dir / output, ref_dir / output))
            assert samples == ref_samples, f"ppo: samples.jsonl rows {samples} vs {ref_samples}"
        assert (run_dir / output / "model" / "config.json").is_file()
        for name in weights:
            a, b = load_file(str(ref_dir / output / name)), load_file(str(run_dir / output / name))
            assert a.keys() == b.keys(), name
            for k in a:
                torch.testing.assert_close(b[k], a[k], **tolerance, msg=lambda m, k=k, name=name: f"{stage} {name} {k}: {m}")
                max_diff = max(max_diff, (b[k].double() - a[k].double()).abs().max().item())
        more, lost = steps_redone(read_log(log))
        repeated += more
        lost_per_kill += lost
    print(f"\nFIGURES kill: stage={stage} kills={figures['kills']} runs={figures['runs']} series={figures['series']} "
          f"steps={total} repeated_written={len(repeated)} redone={sum(lost_per_kill)} "
          f"max_redone_per_kill={max(lost_per_kill, default=0)} lost=0 max_weight_diff={max_diff:.2g} "
          f"torn={figures['torn']} leftover={len(figures['leftover'])} "
          f"in_work={figures['in_work']} progressed={figures['progressed']} unit_s={figures['unit_s']:.2f} setup_s={figures['setup_s']:.2f} "
          f"seconds={figures['seconds']:.1f}")
    assert not repeated, f"{stage}: steps trained again although their checkpoint was written: {repeated}"
    # checkpoint_every = 1: a kill loses at most the step after the last checkpoint.
    assert max(lost_per_kill, default=0) <= 1
    assert figures["kills"] >= KILLS
    return figures


def conversations() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Here is a short answer: {q}"}]}
            for q in QUESTIONS]


# The tolerances are those of each trainer's own resume test: SFT's asserts equal weights
# (test_train_sft), the reward model's rtol 1e-5 / atol 1e-6 (test_train_reward), PPO's atol 1e-6
# (test_train_ppo). Every run here is a fork of one process with one thread, so the same sums run
# in the same order; the resume restores the RNG and optimiser states exactly.
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sft(server, seed, tmp_path, tiny_model):
    data = tmp_path / "sft_data.jsonl"
    tmp_path.mkdir(exist_ok=True)
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations()), encoding="utf-8")
    config = {"name": "run", "output_dir": "unused", "stages": ["sft"],
              "sft": {"model": str(tiny_model), "data": str(data), "device": "cpu", "epochs": 3, "batch_size": 2,
                      "max_length": 64, "held_out": 0.125, "checkpoint_every": 1, "lr": 1e-3}}
    run_trainer(server, seed, "sft", config, tmp_path, {"rtol": 0.0, "atol": 0.0}, ["model/model.safetensors"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rm(server, seed, tmp_path, tiny_model):
    from factory.records import Preference

    pairs = tmp_path / "pairs.jsonl"
    tmp_path.mkdir(exist_ok=True)
    rows = []
    for i, q in enumerate(QUESTIONS):
        msgs = [{"role": "user", "content": q}]
        rows.append(Preference(key=f"k{i}", prompt=q, messages=msgs, chosen=f"A careful answer to: {q}",
                               rejected="No idea.", p_chosen=[0.95, 0.7, 0.55, 1.0][i % 4],
                               margin=2 * [0.95, 0.7, 0.55, 1.0][i % 4] - 1, judge_model="hand-made",
                               source=f"q{i}").model_dump_json())
    pairs.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    config = {"name": "run", "output_dir": "unused", "stages": ["rm"],
              "rm": {"model": str(tiny_model), "pairs": str(pairs), "device": "cpu", "epochs": 3, "batch_size": 2,
                     "max_length": 64, "held_out": 0.125, "checkpoint_every": 1, "lr": 1e-3}}
    run_trainer(server, seed, "rm", config, tmp_path, {"rtol": 1e-5, "atol": 1e-6},
                ["model/model.safetensors", "model/scalar_head.safetensors"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ppo(server, seed, tmp_path, tiny_model, reward_dir):
    config = {"name": "run", "output_dir": "unused", "stages": ["ppo"],
              "ppo": {"policy": str(tiny_model), "reward_model": str(reward_dir), "prompts": str(prompts_file(tmp_path)),
                      "device": "cpu", "steps": 16, "batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1,
                      "response_length": 6, "max_prompt_length": 48, "eval_prompts": 2, "eval_every": 4,
                      "checkpoint_every": 1, "lr": 1e-3}}
    run_trainer(server, seed, "ppo", config, tmp_path, {"rtol": 0.0, "atol": 1e-6},
                ["model/model.safetensors", "checkpoint/value.safetensors"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_online_dpo(server, seed, tmp_path, tiny_model):
    """Online DPO asks the judge at every step: killed anywhere, a resumed run asks it nothing whose
    labels online.jsonl already holds, repeats no checkpointed step, and ends with the same weights."""
    config = {**base_config("dpo", f"hf:{tiny_model}", 16),
              "judge": {"constitution": str(ROOT / "principles" / "harmless.yaml")},
              "dpo": {"model": str(tiny_model), "online": True, "prompts": str(prompts_file(tmp_path)), "device": "cpu",
                      "steps": 10, "batch_size": 2, "samples": 3, "response_length": 6, "max_length": 64,
                      "temperature": 1.5, "checkpoint_every": 1, "lr": 1e-3}}
    figures = run_trainer(server, seed, "dpo", config, tmp_path, {"rtol": 0.0, "atol": 1e-6},
                          ["model/model.safetensors"])
    repeated, calls = [], 0
    for log in figures["logs"]:
        events = read_log(log)
        calls += sum(e["ev"] == "call" for e in events)
        repeated += repeated_written(events)
    print(f"FIGURES kill: stage=dpo-online judge_calls={calls} repeated_written={len(repeated)}")
    assert calls and not repeated, f"online dpo: judge requests asked again after their labels were written: {repeated[:5]}"
    for run_dir in figures["dirs"]:  # the same samples and labels as the uninterrupted run, each step once
        got = metric_rows(run_dir / "dpo" / "online.jsonl")
        want = metric_rows(tmp_path / "reference" / "dpo" / "online.jsonl")
        assert [r["step"] for r in got] == list(range(1, 11))
        assert [r["samples"] for r in got] == [r["samples"] for r in want]

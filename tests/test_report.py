"""`factory report`: run folders built from real records and trainer-shaped metrics, rendered to HTML + PNG.

The metrics rows below carry the keys factory/train/{sft,reward,ppo}.py log; `test_metric_keys_match_trainers`
fails if a trainer renames one, so these fixtures cannot drift from what a real run writes.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from factory.cli import cli
from factory.config import RunConfig
from factory.dedup import rouge_l_f1
from factory.pipeline import stage as stage_of
from factory.records import (BootstrapRequest, Candidate, ChatExample, Comparison, Generation, Instance, Instruction,
                             Judgment, Preference, PreferencePair, Revision, Round, Similar, Task, file_sha256)
from factory.records import Reranked
from factory.report import build_report
from factory.report_diversity import seed_similarity, verb_object
from factory.report_rounds import flip_rate
from factory.seeds import load_seeds
from factory.store import Store

REPO = Path(__file__).parents[1]
EVIL = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"
SFT_ROW = {"train/loss": 2.1, "lr": 1e-5, "tokens": 512, "assistant_tokens": 200, "grad_norm": 1.3}
SFT_EPOCH = {"eval/loss": 2.0, "train/epoch_loss": 2.05}
RM_ROW = {"train/loss": 0.69, "train/accuracy": 0.5, "train/margin": 0.01, "lr": 1e-5, "grad_norm": 0.8}
RM_EVAL = {"eval/accuracy": 0.625, "eval/margin": 0.12, "eval/loss": 0.66}
PPO_ROW = {"objective/kl": 0.02, "objective/entropy": 35.0, "objective/scores": 0.1, "objective/rlhf_reward": 0.09,
           "objective/non_score_reward": -0.01, "policy/approxkl_avg": 0.001, "policy/clipfrac_avg": 0.0,
           "loss/policy": -0.01, "loss/value": 0.3, "val/ratio": 1.0, "val/num_eos_tokens": 3,
           "val/clipfrac_avg": 0.0, "lr": 3e-6, "kl_coef": 0.05, "time/step_s": 1.0, "time/generate_s": 0.5,
           "time/score_s": 0.2, "time/update_s": 0.3}
PPO_EVAL = {"eval/score": 0.1, "time/eval_s": 0.4}

FULL_FIGURES = ["stage_counts", "rejections", "instruction_length", "seed_similarity", "verbs", "critique_rounds",
                "judge_labels", "sft_loss", "rm_accuracy", "ppo_curves", "heldout", "principles"]
LATER_ROUND_FIGURES = ["stage_counts", "rejections", "critique_rounds", "judge_labels", "sft_loss", "rm_accuracy",
                       "ppo_curves", "heldout", "principles"]
HELDOUT_LINE = "held-out replies (48 prompts no stage trained on): 74 words -> 41 words (ppo); constitution concise"


def test_metric_keys_match_trainers():
    for module, rows in (("sft", [SFT_ROW, SFT_EPOCH]), ("reward", [RM_ROW]), ("ppo", [PPO_ROW, PPO_EVAL])):
        source = (REPO / "factory" / "train" / f"{module}.py").read_text(encoding="utf-8")
        for key in (k for row in rows for k in row):
            assert f'"{key}"' in source, f"factory/train/{module}.py no longer logs {key!r}"
    reward = (REPO / "factory" / "train" / "reward.py").read_text(encoding="utf-8")
    assert '{f"eval/{k}": v for k, v in result.items()}' in reward
    assert all(f'"{k[5:]}"' in reward for k in RM_EVAL), "reward.evaluate's result keys changed"


# -- building run folders ---------------------------------------------------------------------------


def write_records(path: Path, records: list) -> None:
    Store(path, type(records[0])).append(records)


def write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_manifest(folder: Path, cfg: RunConfig, inputs: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"created": "2025-01-01T00:00:00+00:00", "config_hash": "0" * 16, "config": cfg.model_dump(mode="json"),
                "versions": {}, "backend": {"spec": "hf:embedded"},
                "inputs": {str(p): file_sha256(p) for p in inputs if p.is_file()}, "history": []}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


INSTRUCTIONS = ["Write a short poem about the sea.", "Write the summary of an article for a newspaper.",
                "Explain how a rainbow forms in two sentences.", "Give me three tips for better sleep.",
                "List the planets of the solar system in order.", EVIL + " Translate this sentence into French."]


def bootstrap_files(folder: Path) -> None:
    requests = [
        BootstrapRequest(key="r0", index=0, messages=[{"role": "user", "content": "list"}], shown=["a"], reply="1. x",
                         finish_reason="stop", model="m", candidates=[
                             Candidate(text=t, verdict="accepted") for t in INSTRUCTIONS[:3]] + [
                             Candidate(text="Write a poem about the sea.", verdict="near_duplicate",
                                       duplicate_of=INSTRUCTIONS[0], score=0.9),
                             Candidate(text="Hi.", verdict="too_short")]),
        BootstrapRequest(key="r1", index=1, messages=[], shown=[], reply="nothing", finish_reason="length", model="m",
                         candidates=[], parse_error="no numbered items in the reply"),
        BootstrapRequest(key="r2", index=2, messages=[], shown=[], reply="...", finish_reason="stop", model="m",
                         candidates=[Candidate(text=t, verdict="accepted") for t in INSTRUCTIONS[3:]]
                         + [Candidate(text="Draw a picture of a cat.", verdict="blacklisted")]),
    ]
    write_records(folder / "bootstrap_requests.jsonl", requests)
    write_records(folder / "instructions.jsonl", [
        Instruction(key=f"i{k}", instruction=t, request_id="r0", reply=t, model="m", avg_similarity=0.1,
                    most_similar=[Similar(instruction="Rewrite the sentence so that it sounds formal.", score=0.2)])
        for k, t in enumerate(INSTRUCTIONS)])


def tasks_file(folder: Path) -> None:
    write_records(folder / "tasks.jsonl", [
        Task(key="t0", instruction_key="i0", instruction=INSTRUCTIONS[0], is_classification=False,
             p_classification=0.1, threshold=0.5, instances=[Instance(input="", output="Waves " + EVIL)],
             reply="...", finish_reason="stop", rejected={"empty_output": 2}, model="m"),
        Task(key="t1", instruction_key="i2", instruction=INSTRUCTIONS[2], is_classification=False,
             p_classification=0.2, threshold=0.5, instances=[], reply="...", finish_reason="stop",
             dropped="no_instances", model="m"),
    ])


def data_files(folder: Path, round_tag: str) -> None:
    """critique + judge records (round_tag makes each round's text its own)."""
    revs = []
    for k, prompt in enumerate(INSTRUCTIONS[:4]):
        first = f"first answer {k} {round_tag}"
        rounds = [Round(principle_id="harmless", critique_request="cr", critique=f"critique {EVIL}",
                        revision_request="rr", revision=f"revised {k} {round_tag}"),
                  Round(principle_id="honest", critique_request="cr", critique="fine as is", p_change=0.1,
                        revision=f"revised {k} {round_tag}", skipped=True)]
        revs.append(Revision(key=f"v{k}", prompt_id=f"t{k}", prompt=prompt, constitution="c", constitution_sha256="0",
                             initial=first, rounds=rounds[: 1 + k % 2], final=f"revised {k} {round_tag}", model="m"))
    write_records(folder / "revisions.jsonl", revs)
    write_records(folder / "sft.jsonl", [ChatExample(key=r.key, source=r.key, constitution="c", principles=["harmless"],
                                                     messages=[{"role": "user", "content": r.prompt},
                                                               {"role": "assistant", "content": r.final}])
                                         for r in revs])
    write_records(folder / "critique_pairs.jsonl", [PreferencePair(key=r.key, prompt=r.prompt, chosen=r.final,
                                                                   rejected=r.initial, source=r.key) for r in revs])
    judgments, prefs = [], []
    for k, r in enumerate(revs):
        orders = [0.8, 0.7] if k % 3 else [0.9, 0.4]  # k = 0 and 3 flip with the order
        judgments.append(Judgment(key=f"j{k}", prompt=r.prompt, messages=[{"role": "user", "content": r.prompt}],
                                  responses=[r.initial, r.final], candidates="critique", source=r.key,
                                  principles=["harmless", "helpful"], mode="pairwise", judge_model="m",
                                  comparisons=[Comparison(i=1, j=0, principle_id="harmless", p_orders=orders,
                                                          p=sum(orders) / 2)]))
        prefs.append(Preference(key=f"j{k}:1>0", prompt=r.prompt, messages=[], chosen=r.final, rejected=r.initial,
                                p_chosen=sum(orders) / 2, margin=sum(orders) - 1, principles=["harmless"],
                                judge_model="m", p_orders=orders, consistent=min(orders) > 0.5, source=f"j{k}"))
    judgments.append(Judgment(key="j9", prompt="same", messages=[], responses=["a"], candidates="critique",
                              source="x", principles=["harmless"], mode="pairwise", comparisons=[], judge_model="m",
                              dropped="identical_responses"))
    write_records(folder / "judgments.jsonl", judgments)
    write_records(folder / "preferences.jsonl", prefs)


def trainer_files(folder: Path, rm_accuracy: float, final_kl: float) -> None:
    write_metrics(folder / "sft" / "metrics.jsonl", [
        {"step": 1, "elapsed_s": 0.5, "epoch": 1, **SFT_ROW}, {"step": 2, "elapsed_s": 1.0, "epoch": 1, **SFT_ROW},
        {"step": 2, "elapsed_s": 1.2, "epoch": 1, **SFT_EPOCH}])
    rm = []
    for epoch in (1, 2):
        rm += [{"step": 2 * epoch - 1 + s, "elapsed_s": 1.0, "epoch": epoch, **RM_ROW} for s in (0, 1)]
        rm.append({"step": 2 * epoch, "elapsed_s": 1.0, "epoch": epoch, **RM_EVAL,
                   "eval/accuracy": rm_accuracy - 0.125 * (2 - epoch)})
    write_metrics(folder / "rm" / "metrics.jsonl", rm)
    ppo = [{"step": 0, "elapsed_s": 0.1, **PPO_EVAL}]
    ppo += [{"step": s, "elapsed_s": float(s), **PPO_ROW, "objective/kl": final_kl * s / 4} for s in (1, 2, 3, 4)]
    ppo[-1] |= {**PPO_EVAL, "eval/score": 0.5}
    write_metrics(folder / "policy" / "metrics.jsonl", ppo)
    samples = [{"step": s, "prompt": p, "response": f"reply at {s} {EVIL}", "score": 0.1 * s}
               for s in (0, 4) for p in INSTRUCTIONS[:2]]
    write_metrics(folder / "policy" / "samples.jsonl", samples)
    (folder / "heldout").mkdir()
    (folder / "heldout" / "summary.json").write_text(json.dumps({
        "axis": "words", "prompts": 48, "constitution": "principles/concise.yaml", "line": HELDOUT_LINE,
        "models": {"base": {"spec": "hf:embedded", "mean": 74.0, "words": 74.0, "degenerate": 0.0, "kl": None},
                   "ppo": {"spec": "hf:x", "mean": 41.0, "words": 41.0, "degenerate": 0.02, "kl": 0.031}}}))


def generate_and_rerank_files(folder: Path) -> None:
    write_records(folder / "generations.jsonl", [
        Generation(key="g0", task_id="seed_task_1", messages=[{"role": "user", "content": "Suggest breakfasts."}],
                   text="Oats. " + EVIL, finish_reason="stop", model="m", params={}),
        Generation(key="g1", task_id="seed_task_2", messages=[], text="", finish_reason="length", model="m",
                   params={}, parse_error="empty reply")])
    write_records(folder / "rerank.jsonl", [
        Reranked(key="k0", source="t0", prompt="Name a colour.", messages=[], responses=["red", EVIL],
                 scores=[0.5, -1.0], chosen=0, reward_model="rm/model", model="m")])


STAGES = ["generate", "bootstrap", "instances", "critique", "judge", "rerank", "sft", "rm", "ppo"]


def full_run(name: str = "full") -> Path:
    cfg = RunConfig(name=name, stages=STAGES)
    folder = cfg.run_dir
    write_manifest(folder, cfg, cfg.bootstrap.seeds)
    generate_and_rerank_files(folder)
    bootstrap_files(folder)
    tasks_file(folder)
    data_files(folder, "r1")
    trainer_files(folder, rm_accuracy=0.75, final_kl=0.4)
    return folder


def two_round_run() -> Path:
    cfg = RunConfig(name="loop", stages=STAGES, rounds=2)
    for r in (1, 2):
        rcfg = cfg.model_copy(update={"output_dir": cfg.run_dir, "name": f"round-{r}", "rounds": 1,
                                      "stages": [s for s in STAGES if r == 1 or not stage_of(s).first_round_only]})
        folder = rcfg.run_dir
        write_manifest(folder, rcfg, rcfg.bootstrap.seeds if r == 1 else [])
        if r == 1:
            bootstrap_files(folder)  # round 1 has no generations or reranking: they show as not run
        tasks_file(folder)
        data_files(folder, f"r{r}")
        trainer_files(folder, rm_accuracy=0.5 + 0.25 * r, final_kl=0.3 * r)
    return cfg.run_dir


def pngs(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.png")}


def assert_pngs_decode(out: Path, names) -> None:
    for name in names:
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image.std() > 0, f"{name} is blank"


def not_run(page: str) -> set[str]:
    return set(re.findall(r'<p class="not-run" data-stage="([^"]+)">', page))


def in_folder_with_seeds(root: Path, make):
    """make() run in root, which holds a copy of seeds/seed_tasks.jsonl; its result made absolute."""
    (root / "seeds").mkdir()
    shutil.copy(REPO / "seeds" / "seed_tasks.jsonl", root / "seeds" / "seed_tasks.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        return root / make()


# Built once per module: rendering the figures is most of the cost of a test.
@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    return in_folder_with_seeds(tmp_path_factory.mktemp("full"), lambda: build_report(full_run()))


@pytest.fixture(scope="module")
def loop_report(tmp_path_factory) -> Path:
    return in_folder_with_seeds(tmp_path_factory.mktemp("loop"), lambda: build_report(two_round_run()))


# -- tests ---------------------------------------------------------------------------------------------


def test_full_run(full_report):
    index = full_report
    out = index.parent
    assert out.name == "report" and (out.parent / "manifest.json").is_file()
    assert pngs(out) == {f"{n}.png" for n in FULL_FIGURES}
    assert_pngs_decode(out, pngs(out))
    page = index.read_text(encoding="utf-8")
    # every PNG is embedded in the page too, byte for byte
    for name in pngs(out):
        data = base64.b64encode((out / name).read_bytes()).decode()
        assert f'data-figure="{name}" alt="' in page and data in page, name

    # model text never reaches the page as markup
    assert EVIL not in page and "<img src=x" not in page
    assert html_escaped(EVIL) in page
    assert page.count("<script>") == 1  # the page's own image check, nothing else

    assert not_run(page) == set()
    # rejections by reason, from the candidates' verdicts, the parse failure and the tasks
    for text in ("empty reply 1", "near_duplicate 1", "too_short 1", "blacklisted 1", "no numbered items in the reply 1",
                 "empty_output 2", "task_no_instances 1", "identical_responses 1"):
        assert text in page, text
    assert "generations 2" in page and "prompts 1, responses 2" in page and "kept (reward 0.50)" in page
    assert "position flips 2" in page and "skipped rounds 2" in page and "revisions that changed the text 4" in page
    assert "position-flip rate 0.500" in page
    assert "eval score start 0.100, eval score end 0.500" in page and "held-out accuracy 0.750" in page
    assert "seed file" not in page  # found and unchanged: no note
    assert "5 distinct leading verbs in 6 instructions" in page  # write x2, explain, give, list, script
    assert html_escaped(HELDOUT_LINE) in page and "<td>ppo</td><td>41.000</td><td>0.020</td><td>0.031</td>" in page


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_bootstrap_only(seeded_dir):
    cfg = RunConfig(name="boot", stages=["bootstrap"])
    write_manifest(cfg.run_dir, cfg, cfg.bootstrap.seeds)
    bootstrap_files(cfg.run_dir)
    out = seeded_dir / "elsewhere"
    index = build_report(cfg.run_dir, out)
    assert index == out / "index.html"
    assert not (cfg.run_dir / "report").exists()
    assert pngs(out) == {"stage_counts.png", "rejections.png", "instruction_length.png", "seed_similarity.png",
                         "verbs.png"}
    assert_pngs_decode(out, pngs(out))
    page = index.read_text(encoding="utf-8")
    assert not_run(page) == {"generate", "instances", "critique", "judge", "rerank", "sft", "rm", "ppo", "heldout",
                             "critique and judge"}
    for stage in ("instances", "critique", "judge", "sft", "rm", "ppo"):
        assert f"<td>{stage}</td><td>not run</td>" in page


def test_seeds_found_from_the_run_folder_path_or_reported_missing(seeded_dir, monkeypatch):
    cfg = RunConfig(name="boot", stages=["bootstrap"])
    write_manifest(cfg.run_dir, cfg, cfg.bootstrap.seeds)
    bootstrap_files(cfg.run_dir)
    run = cfg.run_dir.resolve()
    elsewhere = seeded_dir / "other"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # seeds/ is not here, but the run folder's path leads back to it
    page = build_report(run).read_text(encoding="utf-8")
    assert "seed_similarity.png" in page and "not found" not in page

    (seeded_dir / "seeds" / "seed_tasks.jsonl").rename(seeded_dir / "gone.jsonl")
    page = build_report(run).read_text(encoding="utf-8")
    assert "seed file seeds/seed_tasks.jsonl not found" in page
    assert 'data-figure="seed_similarity.png"' not in page
    assert 'data-figure="instruction_length.png"' in page

    # a changed seed file is used, with a note
    shutil.copy(REPO / "seeds" / "seed_tasks.jsonl", seeded_dir / "seeds" / "seed_tasks.jsonl")
    with open(seeded_dir / "seeds" / "seed_tasks.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "x", "name": "x", "instruction": "Name four kinds of tree.", "instances": [], '
                '"is_classification": false}\n')
    page = build_report(run).read_text(encoding="utf-8")
    assert "has changed since the run" in page and 'data-figure="seed_similarity.png"' in page


def test_two_rounds(loop_report):
    index = loop_report
    out = index.parent
    expected = {"rounds.png"} | {f"round-1_{n}.png" for n in FULL_FIGURES}
    expected |= {f"round-2_{n}.png" for n in LATER_ROUND_FIGURES}
    assert pngs(out) == expected
    assert_pngs_decode(out, expected)
    page = index.read_text(encoding="utf-8")
    assert page.index("Rounds compared") < page.index('<section id="round-1">') < page.index('<section id="round-2">')
    # the comparison table: pairs judged, mean p_chosen, flip rate, RM accuracy, PPO reward, KL, eval score
    table = page[page.index("Rounds compared"): page.index('<section id="round-1">')]
    cells = re.findall(r"<tr><td>(round-\d)</td>((?:<td>[^<]*</td>)+)</tr>", table)
    rows = {name: re.findall(r"<td>([^<]*)</td>", rest) for name, rest in cells}
    assert rows == {"round-1": ["4", "0.700", "0.500", "0.750", "0.090", "0.300", "0.500"],
                    "round-2": ["4", "0.700", "0.500", "1.000", "0.090", "0.600", "0.500"]}
    round2 = page[page.index('<section id="round-2">'):]
    assert "<td>instances</td><td>copied from round 1</td>" in round2
    assert "<td>bootstrap</td><td>not run</td>" in round2
    assert not_run(round2) == {"bootstrap", "generate", "rerank"}
    round1 = page[page.index('<section id="round-1">'): page.index('<section id="round-2">')]
    assert "revised 0 r1" in round1 and "revised 0 r2" not in round1  # each round shows its own records
    assert "revised 0 r2" in round2 and "revised 0 r1" not in round2


def test_half_finished_run_without_manifest(seeded_dir):
    # no manifest, nothing judged, a trainer that logged nothing, PPO with only its step-0 eval
    run = seeded_dir / "outputs" / "half"
    bootstrap_files(run)
    write_records(run / "judgments.jsonl", [Judgment(
        key="j", prompt="p", messages=[], responses=["a"], candidates="critique", source="x", principles=["harmless"],
        mode="pairwise", comparisons=[], judge_model="m", dropped="identical_responses")])
    write_metrics(run / "rm" / "metrics.jsonl", [])
    write_metrics(run / "policy" / "metrics.jsonl", [{"step": 0, "elapsed_s": 0.1, **PPO_EVAL}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-legend or other matplotlib warnings either
        index = build_report(run)
    page = index.read_text(encoding="utf-8")
    assert pngs(index.parent) == {"stage_counts.png", "rejections.png", "instruction_length.png", "verbs.png",
                                  "ppo_curves.png", "principles.png"}
    assert "no readable manifest.json, so the seed files are unknown" in page
    assert "no pairs were judged" in page and "metrics.jsonl is empty" in page
    assert not_run(page) == {"generate", "instances", "critique", "rerank", "sft", "heldout"}


def test_missing_or_empty_run_folder(seeded_dir):
    with pytest.raises(FileNotFoundError, match="nope: no such run folder"):
        build_report(seeded_dir / "nope")
    (seeded_dir / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: not a run folder"):
        build_report(seeded_dir / "empty")
    result = CliRunner().invoke(cli, ["report", "empty"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "empty: not a run folder" in result.output


def test_cli_prints_the_page(seeded_dir):
    cfg = RunConfig(name="boot", stages=["bootstrap"])
    write_manifest(cfg.run_dir, cfg, cfg.bootstrap.seeds)
    bootstrap_files(cfg.run_dir)
    result = CliRunner().invoke(cli, ["report", str(cfg.run_dir), "-o", "pages"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(Path("pages") / "index.html")
    assert (seeded_dir / "pages" / "index.html").is_file() and (seeded_dir / "pages" / "verbs.png").is_file()


def test_helpers():
    assert verb_object("Write a short poem about the sea.") == ("write", "short")
    assert verb_object("Give me three tips.") == ("give", "three")
    assert verb_object("Tell us about it!") == ("tell", None)
    assert verb_object("123 ...") is None
    prefs = [Preference(key=str(k), prompt="p", messages=[], chosen="a", rejected="b", p_chosen=0.7, margin=0.4,
                        judge_model="m", source="s", consistent=c) for k, c in enumerate([True, False, False, None])]
    assert flip_rate(prefs) == pytest.approx(2 / 3)
    assert flip_rate(prefs[3:]) is None


def test_seed_similarity_is_exact_rouge(seeded_dir):
    seeds = [t.instruction for t in load_seeds(seeded_dir / "seeds" / "seed_tasks.jsonl")]
    best, mean = seed_similarity(INSTRUCTIONS, seeds)
    for text, b, m in zip(INSTRUCTIONS, best, mean):
        scores = [rouge_l_f1(s, text) for s in seeds]
        assert b == max(scores) and m == pytest.approx(sum(scores) / len(scores))
    assert best[0] > 0.2  # "Write a short poem about the sea." shares words with seeds that ask for poems
    assert seed_similarity(["anything"], []) == ([0.0], [0.0])


# -- the page in a real browser --------------------------------------------------------------------------


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: dict[str, str | None] = {}
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images[a["data-figure"]] = a.get("data-decoded")
        elif tag == "body":
            self.body = a


def rendered(page: Path) -> Images:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed for this test: apt-get install chromium"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    parsed = Images()
    parsed.feed(done.stdout)
    return parsed


def test_chromium_decodes_every_figure(loop_report):
    index = loop_report
    expected = pngs(index.parent)
    dom = rendered(index)
    assert set(dom.images) == expected
    assert all(v == "yes" for v in dom.images.values()), dom.images
    assert dom.body.get("data-images") == f"{len(expected)}/{len(expected)}"

    # the check can fail: a figure whose PNG is corrupt is reported as not decoded
    page = index.read_text(encoding="utf-8")
    start = page.index("base64,", page.index('data-figure="rounds.png"')) + len("base64,")
    broken = index.with_name("broken.html")
    broken.write_text(page[:start] + "AAAA" + page[start + 200:], encoding="utf-8")
    dom = rendered(broken)
    assert dom.images["rounds.png"] == "no"
    assert dom.body.get("data-images") == f"{len(expected) - 1}/{len(expected)}"

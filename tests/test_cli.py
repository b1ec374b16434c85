"""The `factory` command, driven with CliRunner in a temporary folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.config import load_config
from factory.pipeline import run_stages
from factory.records import Generation
from factory.store import read_jsonl

REPO = Path(__file__).parents[1]


@pytest.fixture
def workdir(seeded_dir):
    tmp_path = seeded_dir
    (tmp_path / "tiny.toml").write_text(
        'name = "tiny"\n[backend]\ndevice = "cpu"\n[generate]\nlimit = 3\n'
        "[generate.params]\nmax_tokens = 8\ntemperature = 0.7\nseed = 1\n",
        encoding="utf-8",
    )
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


COMMANDS = [[], ["run"], ["generate"], ["bootstrap"], ["instances"], ["critique"], ["judge"], ["rerank"], ["train"],
            ["train", "sft"], ["train", "rm"], ["train", "ppo"], ["judge-eval"], ["principles", "check"],
            ["principles", "import"], ["pairs"], ["pairs", "import"], ["pairs", "export"], ["export"], ["report"],
            ["config"], ["prepare"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    body = result.output.split("\n\n", 2)[1]
    assert len(body.split()) >= 8, f"help of {command} says too little: {body!r}"


def test_each_stage_and_trainer_is_its_own_command_with_its_docstring_as_help():
    commands = [cli.commands[s] for s in ("generate", "bootstrap", "instances", "critique", "judge", "rerank")]
    commands += [cli.commands["train"].commands[t] for t in ("sft", "rm", "ppo")]
    callbacks = [c.callback for c in commands]
    assert len(set(callbacks)) == len(callbacks)
    for command in commands:
        doc = command.callback.__doc__
        assert doc and command.help and command.help.split()[:5] == doc.split()[:5], command.name


def test_python_m_factory_cli_runs_the_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "factory.cli", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: factory train" in result.stdout or "Usage: python -m factory.cli train" in result.stdout


def test_config_error_is_a_clean_exit_2(workdir):
    (workdir / "bad.toml").write_text("[generate]\nlimt = 3\n[backend]\nspec = 'gpt'\n", encoding="utf-8")
    result = invoke("run", "bad.toml")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "Error: bad.toml: invalid config" in result.output
    assert "generate.limt: unknown key" in result.output
    assert "backend.spec: backend spec must start with one of hf, openai, vllm, scripted" in result.output


def test_bad_override_and_missing_file(workdir):
    result = invoke("config", "tiny.toml", "--set", "generate.limit")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output
    result = invoke("run", "missing.toml")
    assert result.exit_code == 2 and "missing.toml: no such config file" in result.output


def test_missing_seed_file_fails_before_loading_a_model(workdir):
    result = invoke("run", "tiny.toml", "--set", "generate.seeds=[nowhere.jsonl]")
    assert result.exit_code == 2
    assert "nowhere.jsonl: input file not found" in result.output


def test_malformed_seed_line_names_file_line_and_field(workdir):
    seeds = workdir / "seeds" / "seed_tasks.jsonl"
    lines = seeds.read_text(encoding="utf-8").splitlines()
    lines[1] = json.dumps({"id": "x", "name": "x", "instruction": "Do it.", "instances": [], "is_classification": "maybe"})
    seeds.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = invoke("run", "tiny.toml", "--set", "backend.spec=hf:/nonexistent")
    assert result.exit_code == 2
    assert f"{Path('seeds/seed_tasks.jsonl')}:2: field 'is_classification'" in result.output


def test_config_prints_the_resolved_config(workdir):
    result = invoke("config", "tiny.toml", "--backend", "openai:http://127.0.0.1:1/v1#m", "--name", "other")
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["backend"]["spec"] == "openai:http://127.0.0.1:1/v1#m"
    assert resolved["name"] == "other"
    assert resolved["generate"]["params"]["max_tokens"] == 8


@pytest.mark.slow
def test_run_on_the_embedded_model_then_resume(workdir):
    result = invoke("run", "tiny.toml")
    assert result.exit_code == 0, result.output
    out = workdir / "outputs" / "tiny" / "generations.jsonl"
    records = read_jsonl(out, Generation)
    assert len(records) == 3
    assert all(r.text.strip() and r.model.startswith("hf:embedded/") for r in records)
    assert "generate: 3 written, 0 already done, 3 in all" in result.output
    assert records[0].text[:20] in result.output  # the demo shows what the model wrote

    manifest = json.loads((workdir / "outputs" / "tiny" / "manifest.json").read_text())
    seeds = Path("seeds/seed_tasks.jsonl")
    assert manifest["inputs"] == {str(seeds): hashlib.sha256(seeds.read_bytes()).hexdigest()}
    assert manifest["backend"]["model_id"] == records[0].model
    assert manifest["config"]["generate"]["limit"] == 3
    assert set(manifest["versions"]) >= {"factory", "torch", "transformers", "python"}

    before = out.read_bytes()
    again = invoke("run", "tiny.toml", "--show", "0")
    assert again.exit_code == 0, again.output
    assert "generate: 0 written, 3 already done, 3 in all" in again.output
    assert out.read_bytes() == before
    assert len(json.loads((workdir / "outputs" / "tiny" / "manifest.json").read_text())["history"]) == 1


class Counting:
    """The real backend, with a count of the prompts it was asked to answer."""

    def __init__(self, backend):
        self.backend, self.model_id, self.prompts = backend, backend.model_id, 0

    def generate(self, requests, params):
        self.prompts += len(requests)
        return self.backend.generate(requests, params)

    def option_logprobs(self, requests, options):
        return self.backend.option_logprobs(requests, options)

    def close(self):
        pass


@pytest.mark.slow
def test_resume_repeats_no_model_call_and_new_settings_are_new_work(workdir, hf_embedded):
    cfg = load_config(workdir / "tiny.toml", ["generate.limit=2", "backend.batch_size=1"])
    counting = Counting(hf_embedded)
    run_stages(cfg, backend=counting, echo=lambda s: None)
    assert counting.prompts == 2
    # Grow the job: only the new task is asked for.
    run_stages(cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"limit": 3})}), backend=counting, echo=lambda s: None)
    assert counting.prompts == 3
    run_stages(cfg, backend=counting, echo=lambda s: None)
    assert counting.prompts == 3
    # A setting that changes the output changes the keys: the work is done again, beside the old.
    hotter = cfg.generate.model_copy(update={"params": cfg.generate.params.model_copy(update={"temperature": 1.0})})
    run_stages(cfg.model_copy(update={"generate": hotter}), backend=counting, echo=lambda s: None)
    assert counting.prompts == 5
    records = read_jsonl(cfg.run_dir / "generations.jsonl", Generation)
    assert len(records) == 5 and len({r.key for r in records}) == 5


GOOD_PRINCIPLE = """\
  - id: kind
    critique: Point out anything unkind in your last response.
    revision: Rewrite your last response to be kind.
    judge: Which response is kinder?
"""


@pytest.mark.parametrize(
    "body, expected",
    [
        ("  - id: kind\n    critique: Point out anything unkind.\n    judge: Which is kinder?\n",
         "c.yaml:4: principles[0] (id 'kind').revision: missing required key"),
        (GOOD_PRINCIPLE + GOOD_PRINCIPLE, "c.yaml:8: principles[1] (id 'kind').id: duplicate id 'kind' (already used by principles[0])"),
        (GOOD_PRINCIPLE.replace("unkind in your", "unkind in {user}'s"), "unknown placeholder {user}"),
        (GOOD_PRINCIPLE + "    weight: heavy\n", "c.yaml:8: principles[0] (id 'kind').weight: Input should be a valid number (got 'heavy')"),
    ],
)
def test_principles_check_names_the_problem(workdir, body, expected):
    (workdir / "c.yaml").write_text("name: c\ndescription: test\nprinciples:\n" + body, encoding="utf-8")
    result = invoke("principles", "check", "c.yaml")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert expected in result.output


def test_principles_check_and_import(workdir):
    result = invoke("principles", "check", *[str(p) for p in sorted((REPO / "principles").glob("*.yaml"))])
    assert result.exit_code == 0, result.output
    assert "'harmless', 13 principles" in result.output
    result = invoke("principles", "import", str(REPO / "tests" / "fixtures" / "critic_revision.json"), "-o", "out.yaml")
    assert result.exit_code == 0, result.output
    assert invoke("principles", "check", "out.yaml").exit_code == 0
    again = invoke("principles", "import", str(REPO / "tests" / "fixtures" / "critic_revision.json"), "-o", "out.yaml")
    assert again.exit_code == 2 and "out.yaml exists; pass --force" in again.output

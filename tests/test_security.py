"""Security: data files are data, no pickle is ever loaded without the user's say-so, run names and
export paths stay in the output folder, and an API key never reaches a file, a log or a message.

Figures: ``FIGURES security: ...`` lines (pytest -s shows them).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from factory.cli import cli
from factory.config import ConfigError, load_config
from factory.constitution import DECLARED, ConstitutionError, render
from factory.export import ExportError, export_run
from factory.train import TrainError
from factory.train.checkpoints import (
    PICKLED_STATE,
    STATE_JSON,
    STATE_TENSORS,
    flatten_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from factory.train.models import ScalarModel, load_causal_lm

REPO = Path(__file__).parents[1]
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle stream (protocol 2+), a torch.save zip


def invoke(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- 1. checkpoints: safetensors + JSON, never a pickle --------------------------------------------


def _trained(seed: int = 0):
    """A small model with an AdamW and a schedule that have taken two steps (state to save)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(2):
        _step(model, opt, sched)
    return model, opt, sched


def _step(model, opt, sched) -> None:
    loss = model(torch.randn(5, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_state_round_trips_with_int_keys_tuples_and_rng():
    model, opt, sched = _trained()
    state = {"stateful": {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
             "rng": [{"torch": torch.get_rng_state(), "python": random.getstate()}],
             "odd": {"__tensor__": 1, 3: (None, 2.5, float("inf")), "a/b": torch.ones(2), "a": {"b": torch.zeros(2)}}}
    skeleton, tensors = flatten_state(state)
    text = json.dumps(skeleton)  # plain JSON: nothing that needs a Python object to read
    back = unflatten_state(json.loads(text), tensors)
    assert back["stateful"]["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(back["stateful"]["optimizer"]["state"]) == set(opt.state_dict()["state"])  # ints, not "0"
    assert back["rng"][0]["python"] == random.getstate()
    assert torch.equal(back["rng"][0]["torch"], torch.get_rng_state())
    assert back["odd"][3] == (None, 2.5, float("inf")) and back["odd"]["__tensor__"] == 1
    assert torch.equal(back["odd"]["a/b"], torch.ones(2)) and torch.equal(back["odd"]["a"]["b"], torch.zeros(2))
    for k, v in opt.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(back["stateful"]["optimizer"]["state"][k][name], t)
    with pytest.raises(TypeError, match="cannot be saved"):
        flatten_state({"x": object()})
    print(f"FIGURES security: checkpoint state flattened into {len(tensors)} tensors + {len(text)} chars of JSON")


def test_checkpoint_resumes_exactly_and_holds_no_pickle(tmp_path):
    model, opt, sched = _trained()
    ckpt = tmp_path / "checkpoint"
    torch.manual_seed(123)
    save_checkpoint(ckpt, {"model": model}, {"optimizer": opt, "scheduler": sched}, {"step": 2})
    for f in ckpt.iterdir():
        assert not f.read_bytes().startswith(PICKLE_MAGIC), f"{f.name} looks like a pickle"
    assert sorted(f.name for f in ckpt.iterdir()) == sorted(["model.safetensors", STATE_TENSORS, STATE_JSON,
                                                              "state.json"])
    _step(model, opt, sched)  # the uninterrupted run's third step
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = _trained(seed=7)  # other weights, other optimiser state: all must be replaced
    assert load_checkpoint(ckpt, {"model": model2}, {"optimizer": opt2, "scheduler": sched2}) == {"step": 2}
    _step(model2, opt2, sched2)  # same RNG (restored), same state: the same third step
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == sched.get_last_lr()


class Boom:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _old_checkpoint(folder: Path, payload) -> None:
    model, _, _ = _trained()
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"))
    (folder / "state.json").write_text('{"step": 2}\n')
    with open(folder / PICKLED_STATE, "wb") as f:
        pickle.dump(payload, f)


def test_old_pickle_checkpoint_is_refused_with_a_way_forward(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "sft" / "checkpoint"
    _old_checkpoint(ckpt, {"stateful": {}, "rng": [], "evil": Boom(marker)})
    model, opt, _ = _trained(seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainError) as e:
        load_checkpoint(ckpt, {"model": model}, {"optimizer": opt})
    msg = str(e.value)
    assert str(ckpt / PICKLED_STATE) in msg and "pickle" in msg
    assert f"Delete the folder {ckpt}" in msg and "--allow-pickle" in msg
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any change
    # With the flag, torch's restricted unpickler still refuses to run code.
    with pytest.raises(TrainError, match="refused even with --allow-pickle"):
        load_checkpoint(ckpt, {"model": model}, {"optimizer": opt}, allow_pickle=True)
    assert not marker.exists()


def test_old_checkpoint_loads_with_the_flag(tmp_path):
    model, opt, sched = _trained()
    ckpt = tmp_path / "checkpoint"
    _old_checkpoint(ckpt, None)
    torch.save({"stateful": {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                "rng": [{"torch": torch.get_rng_state(), "python": random.getstate()}]}, ckpt / PICKLED_STATE)
    _, opt2, sched2 = _trained(seed=5)
    assert load_checkpoint(ckpt, {"model": model}, {"optimizer": opt2, "scheduler": sched2}, allow_pickle=True)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


# -- 2. model weights: safetensors only, unless --allow-pickle ------------------------------------


@pytest.fixture(scope="module")
def pickled_model(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model saved the old way: pytorch_model.bin (a pickle), no safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-bin")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.save_pretrained(folder)
    # transformers 5 writes safetensors even with safe_serialization=False: write the pickle by hand.
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


def _refusal_ok(msg: str, folder: Path) -> None:
    assert str(folder) in msg and "pickle-based weights refused" in msg and "pytorch_model.bin" in msg
    assert "safe_serialization=True" in msg and "--allow-pickle" in msg


@pytest.mark.slow
def test_pickled_weights_refused_everywhere_and_load_with_the_flag(pickled_model, tiny_model):
    from factory.llm.base import BackendError
    from factory.llm.hf import HFBackend
    from factory.rerank import load_reward_model

    with pytest.raises(BackendError) as e:
        HFBackend(str(pickled_model), device="cpu")
    _refusal_ok(str(e.value), pickled_model)
    with pytest.raises(TrainError) as e:
        load_causal_lm(str(pickled_model), torch.device("cpu"))
    _refusal_ok(str(e.value), pickled_model)
    with pytest.raises(TrainError) as e:
        ScalarModel.from_pretrained(pickled_model, torch.device("cpu"))
    _refusal_ok(str(e.value), pickled_model)

    backend = HFBackend(str(pickled_model), device="cpu", allow_pickle=True)
    safe = load_causal_lm(str(tiny_model), torch.device("cpu"))  # the same weights, from safetensors
    assert torch.equal(backend.model.model.embed_tokens.weight, safe.model.embed_tokens.weight)
    assert load_causal_lm(str(pickled_model), torch.device("cpu"), allow_pickle=True) is not None
    rm_dir = pickled_model.parent / "rm-bin"
    backbone = ScalarModel.from_pretrained(pickled_model, torch.device("cpu"), allow_pickle=True).backbone
    backbone.save_pretrained(rm_dir)
    (rm_dir / "model.safetensors").unlink()
    torch.save(backbone.state_dict(), rm_dir / "pytorch_model.bin")
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm_dir)
    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(rm_dir / "scalar_head.safetensors"))
    (rm_dir / "scalar_model.json").write_text('{"bias": 0.0}')
    with pytest.raises(TrainError, match="pickle-based weights refused"):
        load_reward_model(rm_dir, "cpu")
    assert load_reward_model(rm_dir, "cpu", allow_pickle=True)[0] is not None


@pytest.mark.slow
def test_cli_refuses_pickled_weights_and_takes_the_flag(pickled_model, tmp_path):
    args = ["generate", "--backend", f"hf:{pickled_model}", "--set", f"output_dir={tmp_path}",
            "--set", f"generate.seeds=[{REPO / 'seeds' / 'seed_tasks.jsonl'}]", "--set", "generate.limit=1",
            "--set", "generate.params.max_tokens=2", "--set", "backend.device=cpu"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    _refusal_ok(" ".join(result.output.split()), pickled_model)
    assert json.loads(invoke("config", REPO / "configs" / "demo.toml", "--set", "allow_pickle=true").output)[
        "allow_pickle"] is True
    for command in (["run", REPO / "configs" / "demo.toml"], ["generate"], ["rerank"], ["train", "sft"],
                    ["train", "rm"], ["train", "ppo"]):
        assert "--allow-pickle" in invoke(*command, "--help").output, command


@pytest.mark.slow
def test_cli_flag_loads_pickled_weights(pickled_model, tmp_path):
    result = invoke("generate", "--allow-pickle", "--backend", f"hf:{pickled_model}", "--set",
                    f"output_dir={tmp_path}", "--set", f"generate.seeds=[{REPO / 'seeds' / 'seed_tasks.jsonl'}]",
                    "--set", "generate.limit=1", "--set", "generate.params.max_tokens=2", "--set", "backend.device=cpu")
    assert result.exit_code == 0, result.output


# Patterns that turn file contents into code or objects. Each hit must be on the allowlist below.
DANGEROUS = {
    "torch.load": re.compile(r"\btorch\.load\("),
    "pickle module": re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|marshal|shelve|joblib)\b|"
                                r"\bpickle\.(loads?|Unpickler)\b", re.M),
    "eval": re.compile(r"(?<![.\w])eval\("),
    "exec": re.compile(r"(?<![.\w])exec\("),
    "yaml.load": re.compile(r"\byaml\.(load|load_all|full_load|unsafe_load|unsafe_load_all)\("),
    "unsafe loader": re.compile(r"\b(UnsafeLoader|FullLoader|yaml\.Loader)\b"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "trust_remote_code": re.compile(r"trust_remote_code\s*=\s*True"),
    "numpy pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "compile": re.compile(r"(?<![.\w])compile\("),
    "__import__": re.compile(r"__import__\("),
}
ALLOWED = {
    # An old-format checkpoint, read only when the user passed --allow-pickle, and even then with
    # torch's restricted unpickler (tensors and plain containers only).
    ("factory/train/checkpoints.py", "torch.load"): "return torch.load(pickled, weights_only=True)",
}


def test_no_code_from_data_anywhere_in_the_package():
    hits = []
    files = sorted((REPO / "factory").rglob("*.py"))
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for line in path.read_text(encoding="utf-8").splitlines():
            for name, pattern in DANGEROUS.items():
                if pattern.search(line):
                    allowed = ALLOWED.get((rel, name))
                    if allowed is None or allowed not in line:
                        hits.append(f"{rel}: {name}: {line.strip()}")
    assert not hits, "\n".join(hits)
    print(f"FIGURES security: scanned {len(files)} files for {len(DANGEROUS)} patterns, {len(ALLOWED)} allowed")


# -- 3. templates: only the declared placeholders, each filled once --------------------------------

HOSTILE = ["{prompt.__class__}", "{0}", "{}", "{response!r}", "{critique:>100000}", "%s", "%(prompt)s", "$HOME",
           "{prompt[0]}", "{ prompt }", "{{", "}}", "{", "}", "{{prompt}}", "{{{", "\\{prompt\\}", "{response}",
           "{critique}", "{prompt}", "${{HOME}}", "{__import__('os')}", "\x00", "{{{prompt}}}"]


def reference_render(template: str, values: dict[str, str]) -> str:
    """The documented grammar, read one character at a time: {{ and }} are braces, {name} of a
    given value is that value, and everything else is itself."""
    out, i = [], 0
    while i < len(template):
        two = template[i:i + 2]
        if two in ("{{", "}}"):
            out.append(two[0])
            i += 2
            continue
        m = re.match(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template[i:])
        if m and m.group(1) in values:
            out.append(values[m.group(1)])
            i += m.end()
            continue
        out.append(template[i])
        i += 1
    return "".join(out)


pieces = st.sampled_from(HOSTILE) | st.text(alphabet="{}%$!:>.[]0aprtx_ \n", max_size=6) | st.text(max_size=4)
texts = st.lists(pieces, max_size=8).map("".join)


@settings(max_examples=400, deadline=None)
@given(template=texts, prompt=texts, response=texts, critique=texts)
def test_render_fills_declared_placeholders_once_and_keeps_the_rest(template, prompt, response, critique):
    values = {"prompt": prompt, "response": response, "critique": critique}
    try:
        out = render(template, **values)
    except ConstitutionError as e:
        # Only a {name} that is not declared: never looked up anywhere, and said so.
        assert re.search(r"\{[A-Za-z_]\w*\}", template) and "no value was given" in str(e)
        return
    assert out == reference_render(template, values)
    # Never longer than the template plus one copy of a value per placeholder: no padding, no re-scan.
    uses = len(re.findall(r"\{(prompt|response|critique)\}", template))  # an upper bound
    assert len(out) <= len(template) + uses * max(map(len, values.values()))


@settings(max_examples=200, deadline=None)
@given(value=texts)
def test_a_value_is_inserted_verbatim(value):
    assert render("{prompt}", prompt=value) == value
    assert render("[{response}|{prompt}]", prompt=value, response="{prompt}") == f"[{{prompt}}|{value}]"
    assert render("{critique}{critique}", critique=value) == value + value


@pytest.mark.parametrize("text", [h for h in HOSTILE if not re.fullmatch(r".*\{[A-Za-z_]\w*\}.*", h, re.S)])
def test_hostile_principle_text_stays_literal(text):
    expected = text.replace("{{", "\0L").replace("}}", "\0R").replace("\0L", "{").replace("\0R", "}")
    assert render(text, prompt="P", response="R", critique="C") == expected


def test_undeclared_names_are_never_filled(monkeypatch):
    monkeypatch.setenv("HOME", "/secret-home")
    with pytest.raises(ConstitutionError, match=r"\{HOME\}"):
        render("${HOME}", prompt="p")
    with pytest.raises(ConstitutionError, match="may only use"):
        render("{HOME}", HOME="x")
    assert DECLARED == {"prompt", "response", "critique"}


# -- 4. paths: run names and exports stay in the output folder ------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "", "../evil", "a/b", "a\\b", "/etc", "/tmp/x", "..\\x", "a\x00b",
                                  ".hidden", "x" * 101, "a\nb", "~", "~root"])
def test_bad_run_names_are_config_errors_naming_the_key(name, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"name={json.dumps(name)}", f"output_dir={tmp_path}"])
    assert "name" in str(e.value)
    result = invoke("config", REPO / "configs" / "demo.toml", "--name", name, "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 2 and "name" in result.output


def test_a_run_name_that_is_a_symlink_out_of_the_output_dir_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "demo").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside"):
        load_config(None, ["name=demo", f"output_dir={tmp_path / 'out'}"])
    assert load_config(None, ["name=demo2", f"output_dir={tmp_path / 'out'}"]).run_dir == tmp_path / "out" / "demo2"


@pytest.fixture
def small_run(tmp_path) -> Path:
    from factory.records import ChatExample
    from factory.store import Store

    run = tmp_path / "outputs" / "demo"
    run.mkdir(parents=True)
    Store(run / "sft.jsonl", ChatExample).append([ChatExample(
        key="k1", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        source="t1", constitution="c", principles=["p"])])
    return run


def test_export_stays_in_the_output_folder(small_run, tmp_path):
    outputs = small_run.parent
    (tmp_path / "elsewhere").mkdir()
    (outputs / "link").symlink_to(tmp_path / "elsewhere")
    refused = [outputs / ".." / "x.jsonl", tmp_path / "x.jsonl", Path("/tmp") / f"factory-{secrets.token_hex(4)}.jsonl",
               outputs / "link" / "x.jsonl", Path(f"{outputs}/../outputs/../x.jsonl")]
    for dest in refused:
        with pytest.raises(ExportError, match="outside the output folder"):
            export_run(small_run, "trl-sft", dest, echo=lambda _: None)
        assert not dest.exists()
    with pytest.raises(ExportError, match="NUL"):
        export_run(small_run, "trl-sft", outputs / "a\x00b.jsonl", echo=lambda _: None)
    assert not list((tmp_path / "elsewhere").iterdir())
    # Inside the output folder, and in a new sub-folder of it: written.
    for dest in (outputs / "sft.jsonl", outputs / "exports" / "sft.jsonl"):
        export_run(small_run, "trl-sft", dest, echo=lambda _: None)
        assert json.loads(dest.read_text())["messages"][1]["content"] == "Hello."
    # The CLI says so, as a user error.
    result = invoke("export", small_run, "--format", "trl-sft", "-o", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "outside the output folder" in result.output


@pytest.mark.parametrize("value", ["0", "-1", "+1", "1.5", "1_0", " 1", "1e1", "١", "one", "0x1"])
def test_export_round_must_be_a_plain_positive_number(small_run, value):
    result = invoke("export", small_run, "--format", "trl-sft", "-o", small_run.parent / "x.jsonl", "--round", value)
    assert result.exit_code == 2 and "--round" in result.output, result.output
    with pytest.raises(ExportError, match="--round"):
        export_run(small_run, "trl-sft", small_run.parent / "x.jsonl", round_number=True)  # type: ignore[arg-type]


def test_export_round_one_works(small_run):
    result = invoke("export", small_run, "--format", "trl-sft", "-o", small_run.parent / "x.jsonl", "--round", "1")
    assert result.exit_code == 0, result.output


# -- 5. the API key: sent to the server, and nowhere else ------------------------------------------


class FakeOpenAI:
    """An OpenAI-compatible chat server on 127.0.0.1. Every ``error_every``-th request gets a 500
    whose body echoes the Authorization header (as a careless proxy's debug page would); in
    ``refuse`` mode every request gets a 401 that echoes it too."""

    def __init__(self, error_every: int = 4):
        self.headers: list[str] = []
        self.count = 0
        self.errors = 0
        self.refuse = False
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                auth = self.headers.get("Authorization", "")
                with outer.lock:
                    outer.headers.append(auth)
                    outer.count += 1
                    n = outer.count
                if outer.refuse:
                    status, body = 401, {"error": {"message": f"invalid key in header Authorization: {auth}"}}
                elif n % error_every == 1:
                    outer.errors += 1
                    status, body = 500, {"error": "internal", "debug": {"Authorization": auth, "path": self.path}}
                else:
                    text = (f"Here is a careful answer ({n}): keep the steps short, check each one, and say "
                            "what you are unsure of.")
                    status, body = 200, {
                        "id": f"chatcmpl-{n}", "object": "chat.completion", "model": payload.get("model"),
                        "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"} for i in range(payload.get("n", 1))],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _forms(key: str) -> dict[str, bytes]:
    """The key as it could leak: itself, in its header, base64 (both), and its first 16 characters."""
    return {"key": key.encode(), "header b64": base64.b64encode(f"Bearer {key}".encode()),
            "key b64": base64.b64encode(key.encode()), "key urlsafe b64": base64.urlsafe_b64encode(key.encode()),
            "key prefix": key[:16].encode()}


def _leaks(blob: bytes, key: str) -> list[str]:
    return [name for name, form in _forms(key).items() if form in blob]


def test_api_key_reaches_the_server_and_nothing_else(tmp_path, monkeypatch, caplog):
    key = "sk-factory-test-" + secrets.token_hex(20)
    monkeypatch.setenv("FACTORY_TEST_SECRET", key)
    caplog.set_level(logging.DEBUG)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["How do I boil an egg?",
                                                                           "Name three rivers."]))
    outputs = tmp_path / "outputs"
    with FakeOpenAI() as server:
        config = tmp_path / "run.toml"
        config.write_text(f"""
name = "keyrun"
output_dir = "{outputs}"
stages = ["generate", "critique"]

[backend]
spec = "openai:{server.base_url}#fake-model"
api_key_env = "FACTORY_TEST_SECRET"
max_retries = 2
backoff_s = 0.01
max_concurrency = 2

[generate]
seeds = ["{REPO / 'seeds' / 'seed_tasks.jsonl'}"]
limit = 3

[critique]
constitution = "{REPO / 'principles' / 'harmless.yaml'}"
prompts = "{prompts}"
rounds = 1
""")
        runs = [invoke("run", config)]
        assert runs[0].exit_code == 0, runs[0].output
        server.refuse = True  # the key is revoked: the next run fails, and says so
        runs.append(invoke("generate", "--config", config, "--set", "generate.limit=5"))
        assert runs[1].exit_code == 2 and "401" in runs[1].output, runs[1].output
        runs.append(invoke("report", outputs / "keyrun"))
        runs.append(invoke("export", outputs / "keyrun", "--format", "trl-sft", "-o", outputs / "sft.jsonl"))
        assert [r.exit_code for r in runs[2:]] == [0, 0], [r.output for r in runs[2:]]

    # The key did travel: the test can fail.
    assert server.errors >= 1 and all(h == f"Bearer {key}" for h in server.headers), server.headers[:2]
    assert (outputs / "keyrun" / "sft.jsonl").is_file() and (outputs / "sft.jsonl").is_file()
    found, scanned = {}, 0
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            if hits := _leaks(path.read_bytes(), key):
                found[str(path.relative_to(tmp_path))] = hits
    for i, r in enumerate(runs):
        text = r.output + (r.stderr if r.stderr_bytes is not None else "")
        if hits := _leaks(text.encode(), key):
            found[f"CLI output of command {i}"] = hits
    for rec in caplog.records:
        text = f"{rec.getMessage()} {rec.args!r} {rec.exc_text or ''}"
        if hits := _leaks(text.encode(), key):
            found[f"log record {rec.name}: {rec.getMessage()[:80]}"] = hits
    print(f"FIGURES security: api-key requests={server.count} errors_500={server.errors} files_scanned={scanned} "
          f"log_records={len(caplog.records)} leaks={len(found)}")
    assert not found, found
    assert os.environ["FACTORY_TEST_SECRET"] == key


def test_a_key_cut_by_an_error_excerpt_does_not_leak_half(monkeypatch, caplog):
    """An error body is shortened for messages; a key it echoes must be hidden before the cut, or
    the part before the cut survives the redaction."""
    from factory.llm.base import GenParams
    from factory.llm.openai import OpenAIBackend

    key = "sk-" + secrets.token_hex(24)
    monkeypatch.setenv("FACTORY_TEST_SECRET", key)
    caplog.set_level(logging.DEBUG)
    head = json.dumps({"error": "internal", "pad": "", "Authorization": "Bearer "})[:-2]
    pad = "p" * (280 - len(head))  # the key starts 20 characters before the 300th
    body = json.dumps({"error": "internal", "pad": pad, "Authorization": f"Bearer {key}"}).encode()
    assert body.index(key.encode()) == 280

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(500 if self.headers.get("Authorization") == f"Bearer {key}" else 400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "m", api_key_env="FACTORY_TEST_SECRET",
                                max_retries=1, backoff_s=0.0)
        with pytest.raises(Exception) as e:
            backend.generate([[{"role": "user", "content": "hi"}]], GenParams(max_tokens=4))
    finally:
        httpd.shutdown()
        httpd.server_close()
    said = f"{e.value} {getattr(e.value, 'reasons', '')} " + " ".join(r.getMessage() for r in caplog.records)
    assert "HTTP 500" in said  # the server saw the key, and the error was reported
    assert not _leaks(said.encode(), key), said

"""Config loading: every mistake is refused at start-up with the file, the key path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.config import ConfigError, RunConfig, apply_override, load_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.backend.spec == "hf:embedded"


def test_toml_and_yaml_give_the_same_config(tmp_path):
    t = write(tmp_path, "a.toml", 'name = "x"\n[generate]\nlimit = 3\n[generate.params]\ntemperature = 0.2\n')
    y = write(tmp_path, "a.yaml", "name: x\ngenerate:\n  limit: 3\n  params:\n    temperature: 0.2\n")
    assert load_config(t) == load_config(y)
    assert load_config(t).generate.params.temperature == 0.2


def test_demo_config_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.toml")
    assert cfg.stages == ["bootstrap", "instances", "critique", "judge", "sft", "heldout"]
    assert cfg.backend.spec == "hf:embedded" and cfg.critique.constitution == cfg.judge.constitution
    assert cfg.heldout.axis == "words" and cfg.heldout.limit == 32 and cfg.heldout.params.max_tokens == 192
    rlhf = load_config(Path(__file__).parents[1] / "configs" / "rlhf.toml")
    assert rlhf.stages == ["bootstrap", "instances", "critique", "judge", "rm", "ppo"]


def test_unknown_key_names_the_path(tmp_path):
    p = write(tmp_path, "c.toml", "[generate.params]\ntemprature = 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: invalid config\n  generate.params.temprature: unknown key"


def test_bad_value_says_what_was_expected(tmp_path):
    p = write(tmp_path, "c.yaml", "generate:\n  limit: -3\nbackend:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: invalid config\n")
    assert "  backend.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'lots')" in msg
    assert "  generate.limit: Input should be greater than or equal to 1 (got -3)" in msg


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("gpt4", "backend spec must start with one of hf, openai, vllm, scripted"),
        ("openai:http://127.0.0.1:8000/v1", "openai spec needs the model after '#'"),
        ("hf:", "hf spec needs a model"),
    ],
)
def test_bad_backend_spec(spec, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"backend.spec={spec}"])


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_run_name_cannot_escape_the_output_folder(name):
    with pytest.raises(ConfigError, match="run name must be"):
        load_config(None, [f"name='{name}'"])


def test_invalid_toml_names_the_file_and_line(tmp_path):
    p = write(tmp_path, "c.toml", 'name = "x"\n\nlimit = = 3\n')
    with pytest.raises(ConfigError, match=rf"^{p}: invalid TOML: .*line 3"):
        load_config(p)


def test_yaml_is_loaded_as_data_only(tmp_path):
    p = write(tmp_path, "c.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_top_level_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match="expected a table of settings at the top level, got list"):
        load_config(write(tmp_path, "c.yaml", "- a\n- b\n"))


def test_other_suffix_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a .toml, .yaml or .yml file"):
        load_config(write(tmp_path, "c.json", "{}"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


def test_overrides(tmp_path):
    p = write(tmp_path, "c.toml", "[generate]\nlimit = 3\n")
    cfg = load_config(p, ["generate.limit=5", "generate.params.stop=[\"\\n\", END]", "backend.device=cpu"])
    assert cfg.generate.limit == 5
    assert cfg.generate.params.stop == ("\n", "END")
    assert cfg.backend.device == "cpu"


def test_override_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "generate.limit")
    with pytest.raises(ConfigError, match="'name' is not a table"):
        apply_override({"name": "x"}, "name.sub=1")
    with pytest.raises(ConfigError, match=r"\(defaults\): invalid config\n  stages: must not repeat|stages must not repeat"):
        load_config(None, ["stages=[generate, generate]"])


def test_reference_config_lists_every_key_and_is_current():
    """configs/reference.toml is what `factory config --reference` prints, and it loads to the defaults."""
    from factory.config_reference import reference_toml

    path = Path(__file__).parent.parent / "configs" / "reference.toml"
    assert path.read_text(encoding="utf-8") == reference_toml(), "regenerate: factory config --reference > " + str(path)
    assert load_config(path) == RunConfig()
    text = path.read_text(encoding="utf-8")
    for table in ("backend", "bootstrap.params", "critique", "judge", "sft.lora", "rm", "ppo", "rerank.params"):
        assert f"\n[{table}]" in text
    assert "\nkl_coef = 0.05   # per-token KL penalty" in text and "# max_requests = ..." in text

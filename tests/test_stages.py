"""The stage contract: every stage the config can name is one module's ``STAGE``, and the start-up
check the pipeline derives from their declarations refuses what is missing before a model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from factory.config import RunConfig, Stage, load_config
from factory.layout import RunLayout
from factory.pipeline import STAGES, check_inputs, stage
from factory.stage import Stage as StageBase

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_the_config_names_is_listed_once_with_its_own_section():
    assert set(get_args(Stage)) == set(STAGES)
    for name in STAGES:
        st = stage(name)
        assert isinstance(st, StageBase) and st.name == name
        assert st.section in RunConfig.model_fields
        assert st.trains == (name in ("sft", "rm", "ppo", "dpo"))


def config(tmp_path: Path, stages: list[str], *extra: str) -> RunConfig:
    return load_config(None, [f"output_dir={tmp_path / 'out'}", "name=r", f"stages={json.dumps(stages)}",
                              f"bootstrap.seeds=[\"{REPO / 'seeds/seed_tasks.jsonl'}\"]",
                              f"critique.constitution={REPO / 'principles/harmless.yaml'}",
                              f"judge.constitution={REPO / 'principles/harmless.yaml'}", *extra])


@pytest.mark.parametrize("stages, missing, why", [
    (["instances"], "instructions.jsonl", "no instructions to write instances for"),
    (["critique"], "tasks.jsonl", "no prompts to critique"),
    (["judge"], "revisions.jsonl", "nothing to judge"),
    (["sft"], "sft.jsonl", "nothing to fine-tune on"),
    (["rm"], "preferences.jsonl", "no preference pairs to train the reward model on"),
    (["ppo"], "rm/model", "no reward model for PPO"),
    (["rerank"], "rm/model", "no reward model to rerank with"),
    # a run file written by a stage *later* in the list does not count: it is not there yet
    (["rerank", "rm", "judge", "critique", "instances", "bootstrap"], "rm/model", "no reward model to rerank with"),
    (["critique", "instances", "bootstrap"], "tasks.jsonl", "no prompts to critique"),
])
def test_a_missing_run_file_is_refused_naming_it_and_what_to_do(tmp_path, stages, missing, why):
    with pytest.raises(FileNotFoundError, match=why) as caught:
        check_inputs(config(tmp_path, stages))
    assert str(caught.value).startswith(f"{tmp_path / 'out' / 'r' / missing}: {why}; ")


@pytest.mark.parametrize("stages", [
    ["bootstrap", "instances", "critique", "judge", "rm", "ppo"],
    ["bootstrap", "instances", "critique", "judge", "rm", "rerank", "sft"],
    ["generate"],
])
def test_what_an_earlier_stage_writes_counts_as_there(tmp_path, stages):
    check_inputs(config(tmp_path, stages))


def test_a_run_file_already_in_the_folder_counts_as_there(tmp_path):
    cfg = config(tmp_path, ["critique"])
    with pytest.raises(FileNotFoundError, match="no prompts to critique"):
        check_inputs(cfg)
    RunLayout.of(cfg).tasks.parent.mkdir(parents=True)
    RunLayout.of(cfg).tasks.write_text("")
    check_inputs(cfg)


def test_the_trainers_output_setting_moves_what_they_write_and_what_others_need(tmp_path):
    cfg = config(tmp_path, ["rerank"], "rm.output=scorer")
    with pytest.raises(FileNotFoundError, match="no reward model to rerank with") as caught:
        check_inputs(cfg)
    assert str(caught.value).startswith(str(tmp_path / "out" / "r" / "scorer" / "model"))
    check_inputs(config(tmp_path, ["judge", "rm", "rerank"], "rm.output=scorer", "judge.candidates=samples",
                        f"judge.prompts={REPO / 'seeds/red_team_prompts.jsonl'}",
                        f"rerank.prompts={REPO / 'seeds/red_team_prompts.jsonl'}"))


def test_a_file_the_config_names_must_exist_and_parse(tmp_path):
    with pytest.raises(FileNotFoundError, match="input file not found"):
        check_inputs(config(tmp_path, ["critique"], f"critique.prompts={tmp_path / 'nowhere.jsonl'}"))
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nope": 1}\n')
    with pytest.raises(Exception, match=rf"{bad}:2"):
        check_inputs(config(tmp_path, ["critique"], f"critique.prompts={bad}"))


def test_a_reward_model_named_by_its_absolute_path_counts_as_written_by_an_earlier_rm_stage(tmp_path):
    where = (tmp_path / "out" / "r" / "rm" / "model").resolve()
    check_inputs(config(tmp_path, ["judge", "rm", "ppo"], f"ppo.reward_model={where}", "judge.candidates=samples",
                        f"judge.prompts={REPO / 'seeds/red_team_prompts.jsonl'}",
                        f"ppo.prompts={REPO / 'seeds/red_team_prompts.jsonl'}"))


def test_a_reward_model_must_be_a_folder(tmp_path):
    a_file = tmp_path / "model.bin"
    a_file.write_text("")
    with pytest.raises(FileNotFoundError, match="no reward model for PPO"):
        check_inputs(config(tmp_path, ["ppo"], f"ppo.reward_model={a_file}",
                            f"ppo.prompts={REPO / 'seeds/red_team_prompts.jsonl'}"))

"""``factory train sft|rm|ppo|dpo``: one trainer each, run through the same entry as ``factory run``
(``factory.pipeline.run_stages``), so a trainer writes the run's manifest and its inputs are
checked before any model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from factory.cli.common import config_opt, load_run_config, name_opt, pickle_opt, set_opt, user_errors


@click.group()
def train():
    """Train on the run's data: SFT on sft.jsonl, a reward model on preferences.jsonl,
    then a policy against the reward model (or the judge) with PPO, or straight from the
    pairs (or from the judge, online) with DPO.

    Each trainer writes into its own folder of the run (sft/, rm/, policy/, dpo/): a resumable
    checkpoint/, the final model/, and metrics.jsonl. A killed run picks up from its last
    checkpoint when started again; a finished one is left as it is.
    """


def train_options(fn):
    """The options of a trainer command: --config (defaults without one), --set, --name, --allow-pickle."""
    for option in reversed((config_opt, set_opt, name_opt, pickle_opt)):
        fn = option(fn)
    return fn


def run_trainer(stage: str, config: Path | None, overrides: tuple[str, ...], name: str | None,
                allow_pickle: bool) -> None:
    """Run the trainer ``stage`` alone and print its summary.

    It trains in the config's run folder itself, whatever the config's rounds (the rounds of
    ``factory run`` each have a folder of their own): a one-stage run of one round there.
    """
    from factory.pipeline import run_stages

    cfg = load_run_config(config, overrides, None, name, allow_pickle)
    cfg = cfg.model_copy(update={"stages": [stage], "rounds": 1})
    summary = run_stages(cfg, echo=click.echo)[-1]
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, the first process speaks
        click.echo(json.dumps(summary, indent=2))


@train.command("sft")
@train_options
@user_errors
def train_sft(config, overrides, name, allow_pickle):
    """Fine-tune a model on chat records (the run's sft.jsonl); loss on the assistant's tokens only.

    Settings: [sft] (model, epochs, batch_size, lr, max_length, held_out, lora). Writes
    sft/model/, a causal LM the hf backend loads (hf:outputs/RUN/sft/model), and a
    checkpoint after each epoch.
    """
    run_trainer("sft", config, overrides, name, allow_pickle)


@train.command("rm")
@train_options
@user_errors
def train_rm(config, overrides, name, allow_pickle):
    """Train a reward model on the run's preference pairs (preferences.jsonl).

    A linear head on a causal LM's backbone, Bradley-Terry loss against each pair's soft
    label p_chosen, so an unsure pair teaches less. Prompts are split into train and
    held-out; held-out accuracy and margin are logged each epoch. The reward is then shifted
    so the SFT references score 0 on average. Settings: [rm]. Writes rm/model/ and rm/eval.json.
    """
    run_trainer("rm", config, overrides, name, allow_pickle)


@train.command("ppo")
@train_options
@user_errors
def train_ppo(config, overrides, name, allow_pickle):
    """Optimise a policy against the reward model with PPO (RLHF), with a KL penalty to the
    starting policy.

    The policy starts from the run's sft/model (or the embedded model), the value model
    from the reward model (rm/model); prompts are the run's tasks. With ppo.reward=judge
    the judge (judge.backend) scores each rollout against the starting policy's reply, no
    reward model needed; ppo.advantage=rloo or grpo uses group baselines over
    ppo.samples rollouts per prompt instead of a value model. Settings: [ppo]. Writes
    policy/model/, which can generate the next round (hf:outputs/RUN/policy/model),
    policy/metrics.jsonl and sample generations in policy/samples.jsonl.
    """
    run_trainer("ppo", config, overrides, name, allow_pickle)


@train.command("dpo")
@train_options
@user_errors
def train_dpo(config, overrides, name, allow_pickle):
    """Direct preference optimisation on the run's preference pairs, or online.

    Offline: the pairs are preferences.jsonl (or dpo.pairs); the loss takes each pair's soft
    label p_chosen as its target (p = 1 is plain DPO; dpo.loss=ipo for IPO). The reference
    model's log-probs are computed once, before training, into dpo/reference.jsonl; held-out
    preference accuracy and margins are logged each epoch. Online (dpo.online=true): each step
    the policy samples dpo.samples replies per prompt, the judge (judge.backend, under
    judge.constitution) labels every pair in both orders, and DPO steps on them; every sample
    and label goes to dpo/online.jsonl. The policy starts from the run's sft/model (or the
    embedded model). Settings: [dpo]. Writes dpo/model/ (hf:outputs/RUN/dpo/model).
    """
    run_trainer("dpo", config, overrides, name, allow_pickle)

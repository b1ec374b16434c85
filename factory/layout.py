"""Where things live in a run folder: the one place that spells a run file's name.

A run folder (``outputs/<run>/``, or ``round-N/`` inside it for a run of several rounds) holds
each stage's JSONL files, the trainers' folders and the manifest. Stages, trainers, the
pipeline, the report and the export all take their paths from a ``RunLayout``; nothing else
names a run file. Files inside a *model* folder (weights, the scalar head) are the model
format's business, not the run's, and stay with the code that writes them.

This module imports nothing of the package: every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROUND_PREFIX = "round-"


@dataclass(frozen=True)
class TrainerFolder:
    """One trainer's folder in a run: its final model, resumable checkpoint and logs."""

    root: Path

    @property
    def model(self) -> Path:
        """the final model, written once training is done (a causal LM, or a backbone + scalar head)"""
        return self.root / "model"

    @property
    def checkpoint(self) -> Path:
        """the latest resumable checkpoint (model, optimiser, scheduler, RNG and data position)"""
        return self.root / "checkpoint"

    @property
    def metrics(self) -> Path:
        """one JSON line per logged step, each step once"""
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """what the finished trainer reports (the dict ``factory train`` prints)"""
        return self.root / "summary.json"

    @property
    def evaluation(self) -> Path:
        """the reward model's held-out evaluation"""
        return self.root / "eval.json"

    @property
    def samples(self) -> Path:
        """PPO: the responses sampled at each eval, with their rewards"""
        return self.root / "samples.jsonl"

    @property
    def reference(self) -> Path:
        """DPO: the reference model's log-probs of every pair, computed once before training;
        PPO with reward = judge: the starting policy's greedy reply to each prompt"""
        return self.root / "reference.jsonl"

    @property
    def online(self) -> Path:
        """online DPO: each step's prompts, samples and the judge's labels, written as they come"""
        return self.root / "online.jsonl"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    """the run folder, or a round's folder (``round-N/``) in a run of several rounds"""
    sft_output: str = "sft"
    rm_output: str = "rm"
    ppo_output: str = "policy"
    dpo_output: str = "dpo"

    @classmethod
    def of(cls, cfg, root: Path | None = None) -> "RunLayout":
        """The layout of ``cfg``'s run folder (or of ``root``, a round folder of it)."""
        return cls(Path(root if root is not None else cfg.run_dir), cfg.sft.output, cfg.rm.output, cfg.ppo.output,
                   cfg.dpo.output)

    # -- the run's own files ------------------------------------------------------------------

    @property
    def manifest(self) -> Path:
        """resolved config, versions, model ids and input hashes"""
        return self.root / "manifest.json"

    @property
    def failures(self) -> Path:
        """requests that failed for good, by stage; the next run retries them"""
        return self.root / "failures.jsonl"

    @property
    def generations(self) -> Path:
        return self.root / "generations.jsonl"

    @property
    def bootstrap_requests(self) -> Path:
        """every bootstrap request with every candidate's verdict (the bootstrap's source of truth)"""
        return self.root / "bootstrap_requests.jsonl"

    @property
    def instructions(self) -> Path:
        return self.root / "instructions.jsonl"

    @property
    def tasks(self) -> Path:
        """instructions with their instances: the prompts of critique, judge, rerank and PPO"""
        return self.root / "tasks.jsonl"

    @property
    def revisions(self) -> Path:
        return self.root / "revisions.jsonl"

    @property
    def sft_data(self) -> Path:
        """(prompt, final revision) chats: what the SFT trainer reads by default"""
        return self.root / "sft.jsonl"

    @property
    def critique_pairs(self) -> Path:
        return self.root / "critique_pairs.jsonl"

    @property
    def judge_samples(self) -> Path:
        return self.root / "judge_samples.jsonl"

    @property
    def judgments(self) -> Path:
        return self.root / "judgments.jsonl"

    @property
    def preferences(self) -> Path:
        """soft-labelled pairs: what the reward model reads by default"""
        return self.root / "preferences.jsonl"

    def pairs(self, style: str) -> Path:
        """the preference pairs in TRL's ``standard`` or ``conversational`` format"""
        return self.root / f"pairs_{style}.jsonl"

    @property
    def rerank(self) -> Path:
        return self.root / "rerank.jsonl"

    @property
    def heldout(self) -> Path:
        """the heldout stage's folder: each model's greedy replies to the held-out prompts, and
        ``summary.json`` (the axis' mean per model)"""
        return self.root / "heldout"

    @property
    def report(self) -> Path:
        """the report's folder (index.html and one PNG per figure)"""
        return self.root / "report"

    # -- the trainers' folders ----------------------------------------------------------------

    @property
    def sft(self) -> TrainerFolder:
        return TrainerFolder(self.root / self.sft_output)

    @property
    def rm(self) -> TrainerFolder:
        return TrainerFolder(self.root / self.rm_output)

    @property
    def policy(self) -> TrainerFolder:
        return TrainerFolder(self.root / self.ppo_output)

    @property
    def dpo(self) -> TrainerFolder:
        return TrainerFolder(self.root / self.dpo_output)

    def trained_policy(self, stages) -> Path:
        """The model a run of ``stages`` ends with, the next round's policy: PPO's, else DPO's."""
        return self.policy_model if "ppo" in stages or "dpo" not in stages else self.dpo.model

    @property
    def sft_model(self) -> Path:
        """the SFT trainer's final model, a causal LM folder"""
        return self.sft.model

    @property
    def rm_model(self) -> Path:
        """the reward model's final folder (a backbone with its scalar head)"""
        return self.rm.model

    @property
    def policy_model(self) -> Path:
        """PPO's final policy, a causal LM folder (the next round's generator)"""
        return self.policy.model

    # -- rounds -------------------------------------------------------------------------------

    def round(self, r: int) -> "RunLayout":
        """Round r's layout, in ``round-r/`` of this run folder."""
        return RunLayout(self.root / f"{ROUND_PREFIX}{r}", self.sft_output, self.rm_output, self.ppo_output,
                         self.dpo_output)

    def round_dirs(self) -> list[Path]:
        """The folders of the run's rounds, in order: round-1, round-2, ... or the run folder itself."""
        return [folder for _, folder in self.numbered_rounds()]

    def numbered_rounds(self) -> list[tuple[int, Path]]:
        """(number, folder) of the run's rounds; a run of one round is its own folder, round 1."""
        rounds = [(int(p.name[len(ROUND_PREFIX):]), p) for p in Path(self.root).glob(f"{ROUND_PREFIX}*")
                  if p.is_dir() and p.name[len(ROUND_PREFIX):].isdigit()]
        return sorted(rounds) or [(1, Path(self.root))]

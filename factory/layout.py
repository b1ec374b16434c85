"""Where things live in a run folder: the start of the one run layout (issue 16).

The trainers' folders come first, because their names had drifted: the pipeline honoured
``rm.output`` while PPO and rerank looked in ``rm/`` whatever it said. Every default path to a
trained model is taken from here, from the run (or round) folder and each trainer's ``output``.
This module imports nothing of the package: anything may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path
    """the run folder, or a round's folder (``round-N/``) in a run of several rounds"""
    sft_output: str = "sft"
    rm_output: str = "rm"
    ppo_output: str = "policy"

    @classmethod
    def of(cls, cfg, root: Path | None = None) -> "RunLayout":
        """The layout of ``cfg``'s run folder (or of ``root``, a round folder of it)."""
        return cls(Path(root if root is not None else cfg.run_dir), cfg.sft.output, cfg.rm.output, cfg.ppo.output)

    @property
    def sft_model(self) -> Path:
        """the SFT trainer's final model, a causal LM folder"""
        return self.root / self.sft_output / "model"

    @property
    def rm_model(self) -> Path:
        """the reward model's final folder (a backbone with its scalar head)"""
        return self.root / self.rm_output / "model"

    @property
    def policy_model(self) -> Path:
        """PPO's final policy, a causal LM folder (the next round's generator)"""
        return self.root / self.ppo_output / "model"

"""Trainers: SFT (sft.py), reward model (reward.py), PPO (ppo.py); shared pieces in common.py."""


class TrainError(RuntimeError):
    """Bad training input or state, named by file or key; the CLI shows it without a traceback."""

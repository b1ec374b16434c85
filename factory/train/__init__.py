"""Trainers: SFT (sft.py), reward model (reward.py), PPO (ppo.py), each one file with its ``STAGE``.

What they share, one concern a module: models.py (tokenizer, causal LMs, LoRA, ``ScalarModel``),
chat.py (reading and tokenising conversations), precision.py (autocast, float32 where it matters,
memory), distributed.py (several processes: ``Dist``), optim.py (AdamW and its schedule, seeding),
checkpoints.py (resumable checkpoints), metrics.py (step logs) and finish.py (finished already?
the final save). Their settings are in settings.py; their paths come from ``factory.layout``.
"""


class TrainError(RuntimeError):
    """Bad training input or state, named by file or key; the CLI shows it without a traceback."""

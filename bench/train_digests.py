"""Digests of what SFT, the reward model and PPO train on a tiny model on the CPU, to check that a change
keeps float32 training byte-identical. Compare two versions of the code, e.g.:

    mkdir /tmp/before && git archive 51b3025 | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before .venv/bin/python /tmp/before/bench/train_digests.py /tmp/digests-before
    .venv/bin/python bench/train_digests.py /tmp/digests-after

Each run prints one sha256 prefix per saved weight file and PPO's KL and score curves; equal lines
mean the same weights, bit for bit. (PYTHONPATH wins over the editable install; run the old version's
own copy of this script, which calls the trainers as that version does.) About a minute.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from factory.config import RunConfig
from factory.layout import RunLayout
from factory.llm.embedded import embedded_model_dir
from factory.train.ppo import run_ppo
from factory.train.reward import run_reward
from factory.train.sft import run_sft

TOPICS = ["tea", "rain", "maps", "bread", "owls", "clocks", "snow", "bikes", "glass", "moss", "ink", "kites"]
WEIGHTS = ["sft/model/model.safetensors", "rm/model/model.safetensors", "rm/model/scalar_head.safetensors",
           "policy/model/model.safetensors", "policy/checkpoint/value.safetensors"]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(out: Path) -> None:
    torch.set_num_threads(1)  # one thread: the same reductions in the same order, run after run
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir(progress=False))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = out / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    sft = jsonl(out / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Name a colour of {t}."},
                                                  {"role": "assistant", "content": f"{t.title()} can be grey."}]}
                                    for t in TOPICS])
    pairs = jsonl(out / "prefs.jsonl", [
        {"key": f"k{i}", "prompt": f"Say something about {t}.", "source": "s", "judge_model": "x", "margin": 0.6,
         "messages": [{"role": "user", "content": f"Say something about {t}."}],
         "chosen": f"{t.title()} is lovely.", "rejected": "No.", "p_chosen": 0.8} for i, t in enumerate(TOPICS)])
    prompts = jsonl(out / "prompts.jsonl", [{"prompt": f"Say something about {t}."} for t in TOPICS])
    run = RunConfig(
        output_dir=out / "o", name="r",
        sft=dict(model=str(model_dir), data=sft, epochs=2, batch_size=4, lr=1e-3, max_length=64, device="cpu"),
        rm=dict(model=str(model_dir), pairs=pairs, epochs=2, batch_size=4, lr=1e-3, max_length=64, device="cpu",
                reference=sft),
        ppo=dict(policy=str(model_dir), reward_model=out / "o/r/rm/model", prompts=prompts, steps=3, batch_size=4,
                 mini_batch_size=2, ppo_epochs=2, response_length=8, max_prompt_length=40, eval_prompts=2,
                 eval_every=2, checkpoint_every=2, device="cpu", lr=1e-3, seed=0),
    )
    quiet = lambda *_, **__: None  # noqa: E731
    layout = RunLayout.of(run)
    run_sft(run.sft, layout, echo=quiet)
    run_reward(run.rm, layout, echo=quiet)
    run_ppo(run.ppo, layout, echo=quiet)
    for name in WEIGHTS:
        print(name, hashlib.sha256((run.run_dir / name).read_bytes()).hexdigest()[:16])
    rows = [json.loads(line) for line in layout.policy.metrics.read_text().splitlines()]
    print("ppo objective/kl", [r.get("objective/kl") for r in rows])
    print("ppo objective/scores", [r.get("objective/scores") for r in rows])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/train_digests.py OUTPUT_DIR")
    main(Path(sys.argv[1]))

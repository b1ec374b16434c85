"""GPU check: the hf backend and the three trainers on CUDA in bf16, and the GPU memory they give back.

    python bench/gpu_check.py                 # on a CUDA machine (a few minutes; well under 8)
    python bench/gpu_check.py --device cpu    # the same checks' logic on the CPU, in about a minute

One line per check, ``PASS``, ``FAIL`` or ``SKIP``, then the total; the exit status is 1 if any
check failed. Nothing is downloaded: the tiny model is a random Llama built from a config, with a
byte-level BPE tokenizer trained here with the ``tokenizers`` library and a ChatML template.

(a) backend: ``HFBackend`` in bf16 on the device against float32 on the CPU, on the tiny model and on
    the embedded model (``hf:embedded``; skipped if ``factory prepare`` has not run). Greedy text must
    be the same for every prompt, except where the first differing token is a near-tie: the float32
    model's top two log-probs there are within ``NEAR_TIE`` (0.25) nats, which bf16 rounding may break
    either way. ``option_logprobs`` must agree within ``OPTION_TOL`` (0.2) nats for every option. With
    ``--device cpu`` the bf16 side runs on the CPU too: the same comparison, CPU against CPU.
(b) trainers: ``run_sft``, then ``run_reward``, then ``run_ppo`` (the SFT model as the policy, the
    trained reward model as its reward), a few steps each on the tiny model, with ``dtype = auto``
    (bf16 autocast on CUDA; on the CPU ``bfloat16`` is asked for by name, to run the same path):
    every logged loss finite, the weights changed and saved in float32, PPO's ratio within
    ``RATIO_TOL`` (0.1) of 1 (it is measured before each update, so only bf16 rounding moves it).
(c) memory (CUDA only): after each backend's ``close()`` and after each trainer returns,
    ``torch.cuda.memory_allocated()`` is back within ``LEAK_LIMIT`` (1 MiB) of what it was before the
    model was loaded, cuBLAS's per-stream workspaces not counted; the check also requires that the
    model did take more than that while it ran (so a model left on the CPU cannot pass). The tiny
    model's weights alone are 4.7 MiB in bf16 and 9.4 MiB in float32, so any model left behind fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MIB = 2**20
LEAK_LIMIT = 1 * MIB
NEAR_TIE = 0.25
OPTION_TOL = 0.2
RATIO_TOL = 0.1

PROMPTS = ["What is the capital of France?", "Is a tomato a fruit?", "Write a haiku about rain.",
           "Name three colours of the rainbow."]
OPTIONS = ["Yes", "No", "Not sure"]
CORPUS = [
    "The capital of France is Paris. A tomato is a fruit, and rain falls on the hills.",
    "Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow.",
    "Yes, no, not sure: answer the question briefly and say why. Tea is warm; snow is cold.",
    "Owls fly at night. Bread is baked from flour. Maps show roads, rivers and towns.",
] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Report:
    def __init__(self) -> None:
        self.failed = 0
        self.start = time.time()

    def line(self, status: str, name: str, detail: str) -> None:
        self.failed += status == "FAIL"
        print(f"{status} {name}: {detail} [{time.time() - self.start:.0f}s]", flush=True)

    def check(self, ok: bool, name: str, detail: str) -> None:
        self.line("PASS" if ok else "FAIL", name, detail)

    def guard(self, name: str, fn, *args) -> None:
        """Run a group of checks; an exception fails it with its message instead of ending the script."""
        try:
            fn(*args)
        except Exception as e:  # any failure is a check's failure: report it, go on with the others
            tb = traceback.extract_tb(e.__traceback__)[-1]
            self.line("FAIL", name, f"{type(e).__name__}: {e} ({Path(tb.filename).name}:{tb.lineno})")


# -- the tiny model ---------------------------------------------------------------------------------


def build_tiny(folder: Path) -> Path:
    """A random 4-layer Llama (hidden 256, 2.5M parameters, weights std 0.05 so that greedy choices
    are not all near-ties) and a byte-level BPE tokenizer (~420 tokens) trained on CORPUS, saved as
    a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=special, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.05, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# -- memory -----------------------------------------------------------------------------------------


class Memory:
    """``with Memory(device) as mem:`` around loading, using and releasing a model, then
    ``mem.report(...)``: on CUDA, the allocated bytes after the block must be back within
    LEAK_LIMIT of those before it, and must have gone above it during the block."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.left = self.peak = 0

    @staticmethod
    def allocated() -> int:
        torch.cuda.synchronize()
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # kept per stream once a matmul ran: not a leak
            torch._C._cuda_clearCublasWorkspaces()
        return torch.cuda.memory_allocated()

    def __enter__(self) -> "Memory":
        if self.cuda:
            self.before = self.allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, kind, *_) -> None:
        if self.cuda and kind is None:
            self.left, self.peak = self.allocated() - self.before, torch.cuda.max_memory_allocated() - self.before

    def report(self, report: Report, name: str) -> None:
        if not self.cuda:
            report.line("SKIP", f"memory {name}", "no CUDA device")
            return
        report.check(self.left <= LEAK_LIMIT < self.peak, f"memory {name}", f"{self.left / MIB:+.2f} MiB left "
                     f"of a {self.peak / MIB:.1f} MiB peak (limit {LEAK_LIMIT / MIB:.0f} MiB)")


# -- (a) the hf backend ---------------------------------------------------------------------------------


def near_tie(ref, messages, text_ref: str, text_other: str) -> tuple[int, float]:
    """(index of the first differing token, the float32 model's top-2 log-prob gap there)."""
    tok = ref.tokenizer
    a = tok(text_ref, add_special_tokens=False)["input_ids"]
    b = tok(text_other, add_special_tokens=False)["input_ids"]
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ids = torch.tensor([ref.encode(messages) + a[:k]], device=ref.device)
    with torch.no_grad():
        top = torch.log_softmax(ref.model(input_ids=ids).logits[0, -1].float(), dim=-1).topk(2).values
    return k, float(top[0] - top[1])


def check_backend(report: Report, name: str, model: str, device: torch.device) -> None:
    from factory.llm.base import GenParams
    from factory.llm.hf import HFBackend

    requests = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = GenParams(temperature=0.0, max_tokens=12)
    ref = HFBackend(model, device="cpu", dtype="float32", batch_size=8)
    try:
        want_text = [c[0].text for c in ref.generate(requests, params)]
        want_logps = ref.option_logprobs(requests, OPTIONS)
        # auto on CUDA is bf16 (what a run gets); on the CPU bf16 is named, to compare the same thing
        dtype = "auto" if device.type == "cuda" else "bfloat16"
        with Memory(device) as memory:
            bf16 = HFBackend(model, device=str(device), dtype=dtype, batch_size=8)
            report.check(bf16.info["dtype"] == "bfloat16" and next(bf16.model.parameters()).device.type == device.type,
                         f"hf {name} loads bf16", f"dtype {bf16.info['dtype']} on {bf16.info['device']}")
            got_text = [c[0].text for c in bf16.generate(requests, params)]
            got_logps = bf16.option_logprobs(requests, OPTIONS)
            bf16.close()
        same, ties, bad = 0, [], []
        for messages, w, g in zip(requests, want_text, got_text):
            if w == g:
                same += 1
                continue
            k, gap = near_tie(ref, messages, w, g)
            (ties if gap < NEAR_TIE else bad).append(f"token {k}: gap {gap:.3f} ({w!r} vs {g!r})")
        report.check(not bad, f"hf {name} greedy text",
                     f"{same}/{len(requests)} identical" + (f"; near-ties (< {NEAR_TIE} nats): {ties}" if ties else "")
                     + (f"; differ at a clear choice: {bad}" if bad else ""))
        worst = max(abs(w[o] - g[o]) for w, g in zip(want_logps, got_logps) for o in w)
        report.check(worst <= OPTION_TOL and all(math.isfinite(v) for g in got_logps for v in g.values()),
                     f"hf {name} option_logprobs", f"max |bf16 - fp32| = {worst:.4f} nats (tolerance {OPTION_TOL})")
        memory.report(report, f"hf {name} closed")
    finally:
        ref.close()


# -- (b) the trainers ---------------------------------------------------------------------------------


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def finite(values) -> bool:
    values = list(values)
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def changed(before: Path, after: Path, strip: str = "") -> tuple[bool, bool]:
    """(some tensor the two files share changed, every floating tensor of ``after`` is float32);
    ``strip``: a prefix of ``before``'s names that ``after``'s lack (a causal LM's ``model.``, for its backbone)."""
    from safetensors.torch import load_file

    a = {k.removeprefix(strip): v for k, v in load_file(str(before)).items()}
    b = load_file(str(after))
    moved = any(not torch.equal(a[k], b[k]) for k in a.keys() & b.keys())
    return moved, all(v.dtype == torch.float32 for v in b.values() if v.is_floating_point())


def write_data(folder: Path) -> dict[str, Path]:
    from factory.records import Preference

    topics = ["tea", "rain", "maps", "bread", "owls", "snow", "clocks", "kites"]
    sft = [{"messages": [{"role": "user", "content": f"Say something about {t}."},
                         {"role": "assistant", "content": f"{t.title()} is on the map in the rain."}]} for t in topics]
    prefs = []
    for i, t in enumerate(topics):
        msgs = [{"role": "user", "content": f"Tell me about {t}."}]
        prefs.append(Preference(key=f"k{i}", prompt=msgs[0]["content"], messages=msgs, chosen=f"{t.title()} is warm.",
                                rejected="No.", p_chosen=0.9, margin=0.8, judge_model="check", source=f"check:{i}"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"sft": folder / "sft.jsonl", "pairs": folder / "pairs.jsonl", "prompts": folder / "prompts.jsonl"}
    paths["sft"].write_text("".join(json.dumps(s) + "\n" for s in sft))
    paths["pairs"].write_text("".join(p.model_dump_json() + "\n" for p in prefs))
    paths["prompts"].write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n" for t in topics))
    return paths


def check_trainers(report: Report, tiny: Path, work: Path, device: torch.device) -> None:
    from factory.layout import RunLayout
    from factory.train.ppo import run_ppo
    from factory.train.reward import run_reward
    from factory.train.settings import PPOConfig, RewardConfig, SFTConfig
    from factory.train.sft import run_sft

    data = write_data(work)
    dtype = "auto" if device.type == "cuda" else "bfloat16"
    common = dict(device=str(device), dtype=dtype, lr=1e-3, seed=0)
    quiet = lambda *_, **__: None  # noqa: E731
    layout = RunLayout(work / "check")
    sft_settings = SFTConfig(model=str(tiny), data=data["sft"], epochs=2, batch_size=2, max_length=64, held_out=0.0,
                             **common)
    rm_settings = RewardConfig(model=str(tiny), pairs=data["pairs"], batch_size=4, max_length=64, held_out=0.25,
                               reference=data["sft"], **common)
    ppo_settings = PPOConfig(policy=str(layout.sft_model), prompts=data["prompts"], steps=2, batch_size=2,
                             mini_batch_size=2, ppo_epochs=1, response_length=8, max_prompt_length=40, eval_prompts=2,
                             eval_every=10, checkpoint_every=10, **common)

    def sft() -> None:
        with Memory(device) as memory, contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            summary = run_sft(sft_settings, layout, echo=quiet)
        losses = [r["train/loss"] for r in rows(layout.sft.metrics) if "train/loss" in r]
        moved, fp32 = changed(tiny / "model.safetensors", layout.sft_model / "model.safetensors")
        report.check(finite(losses) and math.isfinite(summary["train_loss"]) and moved and fp32, f"sft ({dtype})",
                     f"{summary['steps']} steps, losses {losses[0]:.3f} -> {losses[-1]:.3f}, weights changed: {moved}, "
                     f"saved float32: {fp32}")
        memory.report(report, "sft returned")

    def rm() -> None:
        with Memory(device) as memory, contextlib.redirect_stderr(io.StringIO()):
            summary = run_reward(rm_settings, layout, echo=quiet)
        losses = [r["train/loss"] for r in rows(layout.rm.metrics) if "train/loss" in r]
        moved, fp32 = changed(tiny / "model.safetensors", layout.rm_model / "model.safetensors", "model.")
        head_ok = math.isfinite(summary["bias"]) and summary["accuracy"] is not None
        report.check(finite(losses) and moved and fp32 and head_ok, f"rm ({dtype})",
                     f"{summary['steps']} steps, losses {losses[0]:.3f} -> {losses[-1]:.3f}, held-out accuracy "
                     f"{summary['accuracy']}, bias {summary['bias']:.3f}, weights changed: {moved}, float32: {fp32}")
        memory.report(report, "rm returned")

    def ppo() -> None:
        with Memory(device) as memory, contextlib.redirect_stderr(io.StringIO()):
            run_ppo(ppo_settings, layout, echo=quiet)
        steps = [r for r in rows(layout.policy.metrics) if "loss/policy" in r]
        keys = ("loss/policy", "loss/value", "objective/kl", "objective/entropy", "objective/scores")
        ok = bool(steps) and all(finite(r[k] for k in keys) for r in steps)
        ratio = max(abs(r["val/ratio"] - 1) for r in steps) if steps else math.inf
        moved, fp32 = changed(layout.sft_model / "model.safetensors", layout.policy.checkpoint / "policy.safetensors")
        report.check(ok and ratio <= RATIO_TOL and moved and fp32, f"ppo ({dtype})",
                     f"{len(steps)} steps, losses finite: {ok}, max |ratio - 1| = {ratio:.4f} (tolerance {RATIO_TOL}), "
                     f"entropy {steps[-1]['objective/entropy']:.2f}, policy changed: {moved}, float32: {fp32}")
        memory.report(report, "ppo returned")

    report.guard("sft", sft)
    report.guard("rm", rm)  # independent of sft
    if (layout.sft_model / "config.json").is_file() and (layout.rm_model / "config.json").is_file():
        report.guard("ppo", ppo)
    else:
        report.line("FAIL", "ppo", "not run: it trains the SFT model against the reward model, and one is missing")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to smoke-test the checks' logic")
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded model's backend check")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    device = torch.device(args.device)
    report = Report()
    if device.type == "cuda" and not torch.cuda.is_available():
        report.line("FAIL", "device", f"{args.device} asked for, but torch sees no CUDA device (use --device cpu)")
        return 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {where}: torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tiny = build_tiny(Path(tmp) / "tiny")
        report.guard("hf tiny", check_backend, report, "tiny", str(tiny), device)
        if args.no_embedded:
            report.line("SKIP", "hf embedded", "--no-embedded")
        else:
            try:
                from factory.llm.embedded import embedded_model_dir

                embedded_model_dir(progress=False)
            except Exception as e:  # not prepared (no wheel, or not converted): the check does not apply
                report.line("SKIP", "hf embedded", f"the embedded model is not available ({e}); run `factory prepare`")
            else:
                report.guard("hf embedded", check_backend, report, "embedded", "embedded", device)
        report.guard("trainers", check_trainers, report, tiny, Path(tmp) / "runs", device)
    status = "FAILED" if report.failed else "all passed"
    print(f"gpu_check: {status} ({report.failed} failed) in {time.time() - report.start:.0f}s", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

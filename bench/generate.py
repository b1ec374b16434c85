"""Tokens/s of the hf backend against plain ``model.generate`` on the same prompts.

Both sides use the same loaded model, the same chat-templated prompts, greedy
decoding and the same token budget, so they produce the same tokens; only the
wrapping differs. Runs alternate between the two and the best of each is kept,
because these machines are shared and noisy: the ratio is what matters.

    python bench/generate.py [--batch-sizes 1,16,64] [--max-tokens 64] [--repeats 3]

Target: ratio (backend / plain) >= 0.95 at every batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from factory.llm.base import GenParams
from factory.llm.hf import HFBackend

TOPICS = [
    "the water cycle", "compound interest", "how vaccines work", "the French revolution", "photosynthesis",
    "black holes", "supply and demand", "the immune system", "machine learning", "plate tectonics",
    "the printing press", "climate change", "how a bicycle stays upright", "the stock market", "volcanoes",
    "the human heart",
]
FORMS = ["Explain {} to a ten-year-old.", "Give three facts about {}.", "Write a short poem about {}.",
         "Summarise what you know about {} in two sentences."]
PROMPTS = [form.format(topic) for topic in TOPICS for form in FORMS]  # 64 distinct prompts


def plain_generate(backend: HFBackend, requests, max_tokens: int) -> int:
    """The reference: what a user writes by hand with transformers. Returns new tokens."""
    tok = backend.tokenizer
    texts = [tok.apply_chat_template(r, add_generation_prompt=True, tokenize=False) for r in requests]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(backend.device)
    with torch.no_grad():
        out = backend.model.generate(
            **enc, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            pad_token_id=backend.pad_id, eos_token_id=backend.eos_ids,
        )
    new = out[:, enc["input_ids"].shape[1]:]
    ends = torch.isin(new, torch.tensor(backend.eos_ids + [backend.pad_id], device=new.device))
    # tokens up to (not including) the first end token, as the backend counts them
    first_end = torch.where(ends.any(1), ends.float().argmax(1), torch.full_like(ends[:, 0], new.shape[1], dtype=torch.long))
    return int(first_end.sum())


def backend_generate(backend: HFBackend, requests, max_tokens: int) -> int:
    out = backend.generate(requests, GenParams(temperature=0.0, max_tokens=max_tokens))
    return sum(c[0].tokens for c in out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    backend = HFBackend(args.model, device=args.device, batch_size=max(int(b) for b in args.batch_sizes.split(",")))
    print(f"model {backend.model_id} on {backend.device}, {torch.get_num_threads()} threads, "
          f"{args.max_tokens} new tokens, best of {args.repeats}")
    backend_generate(backend, [[{"role": "user", "content": "Hello"}]], 4)  # warm-up

    rows = []
    ok = True
    print(f"{'batch':>5} {'plain tok/s':>12} {'factory tok/s':>14} {'ratio':>6}")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        requests = [[{"role": "user", "content": p}] for p in PROMPTS[:bs]]
        best = {"plain": 0.0, "factory": 0.0}
        for _ in range(args.repeats):
            for name, fn in (("plain", plain_generate), ("factory", backend_generate)):
                t0 = time.perf_counter()
                tokens = fn(backend, requests, args.max_tokens)
                best[name] = max(best[name], tokens / (time.perf_counter() - t0))
        ratio = best["factory"] / best["plain"]
        ok &= ratio >= 0.95
        rows.append({"batch_size": bs, "plain_tok_s": best["plain"], "factory_tok_s": best["factory"], "ratio": ratio})
        print(f"{bs:>5} {best['plain']:>12.1f} {best['factory']:>14.1f} {ratio:>6.2f}", flush=True)
    print("PASS: ratio >= 0.95 at every batch size" if ok else "FAIL: ratio below 0.95 somewhere")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(backend.device), "max_tokens": args.max_tokens, "rows": rows}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Three tokenizer families built in the test, with tiny random models: no downloads.

- ``bpe``: byte-level BPE with a ChatML template, as SmolLM2/Qwen/Llama-3 tokenise; like Qwen's
  base models, its EOS (``<|endoftext|>``) is not the token that ends a turn (``<|im_end|>``).
- ``metaspace``: SentencePiece-style BPE (Metaspace, "▁" for spaces, one prepended at the start)
  with Llama-2's ``[INST]`` template, turn ended by ``</s>``: "A" alone is "▁A", but after
  "Answer: (" the text goes on with a bare "A".
- ``gemma``: a Gemma-like template whose model turn ends with a dedicated ``<end_of_turn>`` token,
  distinct from EOS (``<eos>``), over a Metaspace tokenizer that prepends nothing.

Each is saved with a tiny randomly initialised Llama as a model folder that ``HFBackend`` and the
trainers load like any other.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Answer: (A) or (B)? The answer is A. Yes or no? No, it is B.",
    "Which reply follows the principle better? Reply A is kind; reply B is rude.",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "Is the task a classification task? Yes. No. Maybe. 1 2 3 4 5 6 7 8 9 10",
    "Hello there, how are you today? I am fine, thank you for asking.",
    "Explain why the sky is blue in two sentences. Light scatters in the air.",
    "[INST] Say something about tea. [/INST] Yes. The reply is better. Write, say, model, user.",
    "The answer is A. The answer is B. Pick A or B: A B A B A B.",
] * 4

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not (loop.last and m['role'] == 'assistant' and continue_final_message is defined "
    "and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{% if not (loop.last and continue_final_message is defined "
    "and continue_final_message) %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}{% if not (loop.last and m['role'] == 'assistant' and continue_final_message is defined "
    "and continue_final_message) %}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

FAMILIES = {
    # name: (kind, specials, template, bos, eos, pad, the token that ends an assistant turn)
    "bpe": ("bytelevel", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"], CHATML,
            None, "<|endoftext|>", "<|pad|>", "<|im_end|>"),
    "metaspace": ("metaspace", ["<unk>", "<s>", "</s>"], LLAMA2, "<s>", "</s>", None, "</s>"),
    "gemma": ("metaspace-never", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], GEMMA,
              "<bos>", "<eos>", "<pad>", "<end_of_turn>"),
}


def build_tokenizer(name: str):
    """A ``PreTrainedTokenizerFast`` of the family ``name``, trained on ``CORPUS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    kind, specials, template, bos, eos, pad, _ = FAMILIES[name]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        scheme = "first" if kind == "metaspace" else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet = sorted(set("".join(CORPUS)).union("▁\n"))
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    kw = {"eos_token": eos, "chat_template": template}
    if bos:
        kw["bos_token"] = bos
    if pad:
        kw["pad_token"] = pad
    if "<unk>" in specials:
        kw["unk_token"] = "<unk>"
    extra = [t for t in specials if t not in kw.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=extra, **kw)


def build_model_dir(name: str, folder: Path, eos_in_generation_config: bool = False) -> Path:
    """Tokenizer ``name`` and a tiny random Llama saved in ``folder``. The generation config names
    only the tokenizer's EOS unless ``eos_in_generation_config`` lists the end-of-turn token too."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(name)
    turn_end = tok.convert_tokens_to_ids(FAMILIES[name][6])
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    eos = [tok.eos_token_id, turn_end] if eos_in_generation_config else tok.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tok.pad_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder

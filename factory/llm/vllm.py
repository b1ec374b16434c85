"""vLLM offline engine: the GPU path (``pip install 'factory[vllm]'``), imported only when chosen.

Conversations are rendered with the model's chat template here, exactly as in the hf
backend, and handed to the engine as token ids, so both backends see the same prompt.
``option_logprobs`` asks for the prompt log-probabilities of prompt+option and sums
those of the option tokens.
"""

from __future__ import annotations

from typing import Sequence

from factory.llm.base import BackendError, Completion, GenParams, Messages, chat_text, check_options, cut_at_stop, normalise


class VLLMBackend:
    def __init__(
        self, model: str, dtype: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
        allow_pickle: bool = False,
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise BackendError(
                "the vllm backend needs the vllm package and a CUDA GPU: pip install 'factory[vllm]'"
            ) from None
        from factory.llm.embedded import resolve_model

        path, self.model_id = resolve_model(model, "vllm")
        self.llm = LLM(
            model=path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            # "auto" would fall back to unpickling *.bin weights; that takes the user's explicit flag.
            load_format="auto" if allow_pickle else "safetensors",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.info = {"path": path, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size}

    def encode(self, messages: Messages) -> list[int]:
        text = chat_text(self.tokenizer, messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        prompts = [TokensPrompt(prompt_token_ids=self.encode(r)) for r in requests]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        results = []
        for out in outputs:
            row = []
            for o in out.outputs:
                text, stopped = cut_at_stop(o.text, params.stop)
                ended = stopped or o.finish_reason != "length"
                row.append(Completion(text=text, finish_reason="stop" if ended else "length", tokens=len(o.token_ids)))
            results.append(row)
        return results

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        opts = check_options(options)
        opt_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts]
        prompts = [self.encode(r) for r in requests]
        seqs = [p + o for p in prompts for o in opt_ids]
        # prompt_logprobs=0: the log-probability of each actual prompt token, no alternatives.
        sampling = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sampling, use_tqdm=False)
        results = []
        for i in range(len(prompts)):
            scores = {}
            for k, (opt, ids) in enumerate(zip(opts, opt_ids)):
                out = outputs[i * len(opts) + k]
                seq = seqs[i * len(opts) + k]
                total = 0.0
                for pos in range(len(seq) - len(ids), len(seq)):
                    entry = out.prompt_logprobs[pos]
                    if entry is None or seq[pos] not in entry:
                        raise BackendError(f"vLLM returned no prompt log-probability for option {opt!r}")
                    total += entry[seq[pos]].logprob
                scores[opt] = total
            results.append(normalise(scores))
        return results

    def close(self) -> None:
        self.llm = None

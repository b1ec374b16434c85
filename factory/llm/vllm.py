"""vLLM offline engine: the GPU path (``pip install 'factory[vllm]'``), imported only when chosen.

Conversations are rendered with the model's chat template here, exactly as in the hf
backend, and handed to the engine as token ids, so both backends see the same prompt.
vLLM schedules its own batches: ``backend.batch_size`` only sizes the stages' batches here,
never a forward pass.

``option_logprobs`` scores each option as the ids of prompt + option tokenised at once
(``option_sequences``). Single-token options are read from one generated token of one
request per prompt; longer ones from the prompt log-probabilities of prompt + option.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Sequence

from factory.llm.base import (
    BackendError,
    Completion,
    GenParams,
    Messages,
    chat_text,
    check_options,
    cut_at_stop,
    end_of_turn_ids,
    normalise,
    sample_seed,
    split_options,
)

# vLLM refuses more log-probabilities per token than the engine's max_logprobs (20 unless set);
# a larger single-token pool is scored through prompt log-probabilities instead.
MAX_LOGPROBS = 20


class VLLMBackend:
    def __init__(
        self, model: str, dtype: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
        allow_pickle: bool = False, max_model_len: int | None = None, enforce_eager: bool = False, seed: int = 0,
        trust_remote_code: bool = False,
    ):
        try:
            from vllm import LLM
        except ImportError:
            raise BackendError(
                "the vllm backend needs the vllm package and a CUDA GPU: pip install 'factory[vllm]'"
            ) from None
        from factory.llm.embedded import resolve_model

        path, self.model_id = resolve_model(model, "vllm")
        engine: dict = dict(
            model=path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            # "auto" would fall back to unpickling *.bin weights; that takes the user's explicit flag.
            load_format="auto" if allow_pickle else "safetensors",
            enforce_eager=enforce_eager,
            seed=seed,
            trust_remote_code=trust_remote_code,
            # Sampled-token log-probabilities after the allowed-token mask: the single-token
            # option path reads them normalised over the options alone. Generation asks for no
            # log-probabilities, and prompt log-probabilities are the same in every mode.
            logprobs_mode="processed_logprobs",
        )
        if max_model_len is not None:
            engine["max_model_len"] = max_model_len
        self._dist_before = _distributed_initialized()
        try:
            self.llm = LLM(**engine)
        except Exception as e:
            if not trust_remote_code and ("trust_remote_code" in str(e) or "trust-remote-code" in str(e)):
                raise BackendError(
                    f"model {model!r} ships Python code of its own (its architecture or tokenizer), which runs "
                    "with every right this process has. If you trust its source, pass --trust-remote-code "
                    f"(config key backend.trust_remote_code = true). vLLM said: {e}"
                ) from None
            raise
        self.tokenizer = self.llm.get_tokenizer()
        self.end_ids = end_of_turn_ids(self.tokenizer)
        self.info = {
            "path": path, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size, "seed": seed,
            "max_model_len": max_model_len, "enforce_eager": enforce_eager,
        }

    def encode(self, messages: Messages) -> list[int]:
        text = chat_text(self.tokenizer, messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generate ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def sampling(n: int, seed: int | None) -> "SamplingParams":
            return SamplingParams(
                n=n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                stop=list(params.stop) or None,
                # every id that ends the assistant's turn, not only the EOS vLLM knows (hf does the same)
                stop_token_ids=self.end_ids,
                seed=seed,
            )

        prompts = [TokensPrompt(prompt_token_ids=self.encode(r)) for r in requests]
        n = params.n
        if params.seed is None:
            outputs = self.llm.generate(prompts, sampling(n, None), use_tqdm=False)
            rows = [list(out.outputs) for out in outputs]
        else:
            # One request per sample, each with a seed of its own (``base.sample_seed``, as over HTTP):
            # vLLM seeds a request's n samples from its one seed, and the same call gives the same text.
            flat = [sampling(1, sample_seed(params.seed, j)) for _ in prompts for j in range(n)]
            outputs = self.llm.generate([p for p in prompts for _ in range(n)], flat, use_tqdm=False)
            rows = [[o for out in outputs[i * n : (i + 1) * n] for o in out.outputs] for i in range(len(prompts))]
        results = []
        for row in rows:
            completions = []
            for o in row:
                text, stopped = cut_at_stop(o.text, params.stop)
                ended = stopped or o.finish_reason != "length"
                completions.append(
                    Completion(text=text, finish_reason="stop" if ended else "length", tokens=len(o.token_ids))
                )
            results.append(completions)
        return results

    # -- option_logprobs --------------------------------------------------------------------

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        opts = check_options(options)
        scores = [[0.0] * len(opts) for _ in requests]
        # (When the prompt's last token merges with the options, the shared ids end before the
        # prompt's end: they are then the prompt, as in the hf backend.)
        single, pairs = split_options(self.tokenizer, requests, opts, max_single=MAX_LOGPROBS)

        if single:
            # One prefill per prompt: generate one token allowed only among the options and read
            # their log-probabilities. With logprobs_mode="processed_logprobs" these come after
            # the allowed-token mask, so the top len(ids) entries are exactly the options.
            # temperature=1: processed log-probabilities are divided by the temperature.
            sampling = [
                SamplingParams(max_tokens=1, temperature=1.0, allowed_token_ids=sorted(set(ids)),
                               logprobs=len(set(ids)))
                for _, _, ids in single
            ]
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for _, p, _ in single], sampling, use_tqdm=False
            )
            for (i, _, ids), out in zip(single, outputs):
                steps = out.outputs[0].logprobs
                entry = steps[0] if steps else None
                if entry is None or any(t not in entry for t in ids):
                    raise BackendError(f"vLLM returned no log-probability for some of the options {opts!r}")
                scores[i] = [entry[t].logprob for t in ids]

        if pairs:
            # prompt_logprobs=0: the log-probability of each actual prompt token, no alternatives.
            sampling = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=s) for _, _, _, s in pairs], sampling, use_tqdm=False
            )
            for (i, k, start, seq), out in zip(pairs, outputs):
                total = 0.0
                for pos in range(start, len(seq)):
                    entry = out.prompt_logprobs[pos] if out.prompt_logprobs else None
                    if entry is None or seq[pos] not in entry:
                        raise BackendError(f"vLLM returned no prompt log-probability for option {opts[k]!r}")
                    total += entry[seq[pos]].logprob
                scores[i][k] = total
        return [normalise(dict(zip(opts, row))) for row in scores]

    # -- close ------------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the engine down and hand its GPU memory back, so the next engine or a trainer
        finds the GPU empty. Safe to call twice."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        # vLLM's own teardown first: LLM.shutdown where a version has it, else the v1 engine
        # core's (which stops its worker processes); older versions only free on collection.
        shutdown = getattr(llm, "shutdown", None)
        if not callable(shutdown):
            shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):  # a half-dead engine must not stop the rest
                shutdown()
        del llm
        with contextlib.suppress(ImportError):
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            with contextlib.suppress(Exception):
                destroy_model_parallel()
            # The process group is vLLM's only when it did not exist before the engine started.
            if not self._dist_before:
                with contextlib.suppress(Exception):
                    destroy_distributed_environment()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _distributed_initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()

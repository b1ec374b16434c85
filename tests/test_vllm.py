"""The vLLM backend: needs the vllm package and a CUDA GPU, so it is skipped elsewhere."""

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def vllm_backend():
    from factory.llm.vllm import VLLMBackend

    b = VLLMBackend("embedded", gpu_memory_utilization=0.3)
    yield b
    b.close()


def test_generate_and_options_agree_with_hf(vllm_backend):
    from factory.llm.base import GenParams
    from factory.llm.hf import HFBackend

    chat = [[{"role": "user", "content": "Is water wet? Answer Yes or No."}]]
    out = vllm_backend.generate(chat, GenParams(temperature=0, max_tokens=8, n=1))
    assert out[0][0].text.strip()
    hf = HFBackend("embedded", device="cuda", dtype="float32")
    want = hf.option_logprobs(chat, ["Yes", "No", "Not sure"])[0]
    got = vllm_backend.option_logprobs(chat, ["Yes", "No", "Not sure"])[0]
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=0.05)


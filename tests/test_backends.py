"""Choosing a backend from its spec."""

import importlib.util

import pytest

from factory.config import BackendConfig
from factory.llm import load_backend
from factory.llm.base import BackendError


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_without_vllm_is_a_clear_error():
    with pytest.raises(BackendError, match=r"needs the vllm package and a CUDA GPU: pip install 'factory\[vllm\]'"):
        load_backend(BackendConfig(spec="vllm:embedded"))


def test_scripted_is_not_for_configs():
    with pytest.raises(BackendError, match="for unit tests"):
        load_backend(BackendConfig(spec="scripted"))


def test_openai_spec_is_split_into_url_and_model(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-planted-secret")
    b = load_backend(BackendConfig(spec="openai:http://127.0.0.1:9/v1#my-model", api_key_env="MY_KEY"))
    try:
        assert b.model_id == "openai:http://127.0.0.1:9/v1#my-model"
        assert "sk-planted-secret" not in repr(b)
    finally:
        b.close()


def test_hf_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf backend: no model folder at"):
        load_backend(BackendConfig(spec=f"hf:{tmp_path / 'no-such-model'}", device="cpu"))


def test_cuda_without_cuda_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from factory.llm.hf import _resolve_device

    with pytest.raises(BackendError, match="torch sees no CUDA device"):
        _resolve_device("cuda")

"""Data-parallel copies through Ray (``backend.workers``), on a local Ray instance with 2 CPU
workers and the real embedded model. One pool serves the whole module: starting Ray and
loading the model in two actors costs 40-60 s on 2 busy cores."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import free_port

from factory.config import BackendConfig, ConfigError, GenerateConfig, RunConfig, load_config
from factory.llm import load_backend
from factory.llm.base import Backend, BackendError, GenParams
from factory.llm.raypool import shard_params, shards
from factory.pipeline import run_stages

QUESTIONS = [
    "Name three colours.",
    "What is 2 + 2? Answer briefly.",
    "Write one sentence about cats and the rain.",
    "What is the capital of France?",
    "Is a tomato a fruit or a vegetable?",
]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


POOL_CFG = BackendConfig(spec="hf:embedded", device="cpu", batch_size=16, workers=2, worker_cpus=1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The single-process reference runs on one thread, like each copy (Ray sets OMP_NUM_THREADS to
    the CPUs it reserves): the same arithmetic, and on 2 shared cores two threads that wait on
    each other made the reference 3-4x slower than the pool."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool():
    pytest.importorskip("ray")
    backend = load_backend(POOL_CFG)
    yield backend
    backend.close()


# -- no Ray needed ------------------------------------------------------------------------------


def test_shards_are_contiguous_balanced_and_cover_everything():
    assert shards(7, 2) == [(0, 4), (4, 7)]
    assert shards(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert shards(1, 4) == [(0, 1)]  # never an empty shard
    assert shards(0, 2) == []


def test_each_shard_samples_from_its_own_seed():
    seeded = GenParams(seed=5)
    assert [shard_params(seeded, k, 2).seed for k in range(2)] == [10, 11]
    assert shard_params(GenParams(seed=6), 0, 2).seed == 12  # no overlap with seed 5's shards
    assert shard_params(GenParams(), 1, 2).seed is None


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'factory\[ray\]'"):
        load_backend(BackendConfig(workers=2))


def test_config_keys_and_impossible_settings():
    cfg = load_config(None, ["backend.workers=4", "backend.ray_address=auto", "backend.worker_gpus=1"])
    assert (cfg.backend.workers, cfg.backend.ray_address, cfg.backend.worker_gpus) == (4, "auto", 1.0)
    with pytest.raises(ConfigError, match="backend.workers"):
        load_config(None, ["backend.workers=0"])
    # Refused before Ray starts: a CUDA device with no GPU reserved, an HTTP backend.
    with pytest.raises(BackendError, match="worker_gpus = 1"):
        load_backend(BackendConfig(workers=2, device="cuda"))
    with pytest.raises(BackendError, match="max_concurrency"):
        load_backend(BackendConfig(workers=2, spec="openai:http://127.0.0.1:1/v1#m"))


def test_an_address_where_no_cluster_listens_fails_at_once():
    pytest.importorskip("ray")
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"ray_address = '127.0.0.1:\d+': no Ray cluster answers"):
        load_backend(BackendConfig(workers=2, ray_address=f"127.0.0.1:{free_port()}"))
    assert time.monotonic() - start < 20  # Ray itself would retry for minutes


# -- a local Ray instance with two copies of the embedded model ---------------------------------

slow = pytest.mark.slow


@slow
def test_pool_is_a_backend_named_like_its_copies(pool, hf_embedded):
    assert isinstance(pool, Backend)
    assert pool.model_id == hf_embedded.model_id
    assert pool.info["workers"] == 2 and pool.info["nodes"] == 1 and pool.info["device"] == "cpu"


@slow
def test_option_logprobs_equal_single_process(pool, hf_embedded):
    requests = [chat(q + " Answer yes or no.") for q in QUESTIONS]
    for options in (["Yes", "No"], ["Paris", "London", "Rome"]):  # one-token and multi-token paths
        got = pool.option_logprobs(requests, options)
        want = hf_embedded.option_logprobs(requests, options)
        assert len(got) == len(requests)
        for g, w in zip(got, want):
            assert list(g) == options
            assert g == pytest.approx(w, abs=1e-4)
        # The check can tell requests apart: a shard returned out of order would fail it.
        firsts = [w[options[0]] for w in want]
        assert max(firsts) - min(firsts) > 0.1


@slow
def test_greedy_generate_equals_single_process(pool, hf_embedded):
    """Each copy gets a different batch than the single process does (3 + 2 requests instead
    of 5), so fp32 sums may differ in the last bits; greedy text only changes where two tokens
    tie to ~1e-6, which these prompts do not (the hf tests show padding leaves them alone)."""
    params = GenParams(temperature=0.0, max_tokens=12)
    requests = [chat(q) for q in QUESTIONS]
    got = pool.generate(requests, params)
    want = hf_embedded.generate(requests, params)
    assert [[c.text for c in r] for r in got] == [[c.text for c in r] for r in want]
    assert [r[0].finish_reason for r in got] == [r[0].finish_reason for r in want]
    assert len({r[0].text for r in want}) == len(QUESTIONS)  # distinct replies: order is checked too


def _generate_cfg(root, name: str, limit: int) -> RunConfig:
    return RunConfig(
        name=name,
        output_dir=root / "outputs",
        backend=POOL_CFG,
        stages=["generate"],
        generate=GenerateConfig(limit=limit, params=GenParams(temperature=0.0, max_tokens=8)),
    )


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@slow
def test_generate_stage_through_the_pool_writes_the_same_rows_and_resumes(pool, hf_embedded, seeded_dir):
    quiet = lambda line: None  # noqa: E731
    before = pool.served()
    run_stages(_generate_cfg(seeded_dir, "ray", 4), backend=pool, echo=quiet)
    after_first = pool.served()
    assert [a - b for a, b in zip(after_first, before)] == [2, 2]  # one batch of 4, split in two

    # The same stage in this process: the same keys, and (greedy) the same texts.
    run_stages(_generate_cfg(seeded_dir, "single", 6), backend=hf_embedded, echo=quiet)
    single = {r["key"]: r for r in _rows(seeded_dir / "outputs" / "single" / "generations.jsonl")}
    first = _rows(seeded_dir / "outputs" / "ray" / "generations.jsonl")
    assert len(first) == 4 and {r["key"] for r in first} < set(single)
    assert all(r["text"] == single[r["key"]]["text"] and r["model"] == pool.model_id for r in first)
    manifest = json.loads((seeded_dir / "outputs" / "ray" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["backend"]["workers"] == 2 and manifest["config"]["backend"]["workers"] == 2

    # A larger limit: only the 2 new items reach the workers, one each; nothing is rewritten.
    run_stages(_generate_cfg(seeded_dir, "ray", 6), backend=pool, echo=quiet)
    assert [a - b for a, b in zip(pool.served(), after_first)] == [1, 1]
    rows = _rows(seeded_dir / "outputs" / "ray" / "generations.jsonl")
    assert rows[:4] == first
    assert {r["key"] for r in rows} == set(single) and len(rows) == 6
    assert all(r["text"] == single[r["key"]]["text"] for r in rows)


@slow
def test_a_workers_own_error_comes_back_as_itself(pool, tmp_path):
    """A missing model folder is a FileNotFoundError in every copy, as in one process (the CLI
    makes it exit code 2). worker_cpus = 0 lets these copies join the module's Ray instance,
    whose 2 CPUs the pool holds; the pool only joined it, so it must leave it running."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_backend(BackendConfig(spec=f"hf:{missing}", device="cpu", workers=2, worker_cpus=0))
    assert pool.served() and pool.model_id  # the module's pool and its Ray instance still answer


@slow
def test_a_dead_worker_is_an_error_not_a_hang(pool):
    """Kills a copy of the module's pool, so it runs last."""
    import ray

    ray.kill(pool.actors[1])
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"(?s)Ray worker 2 of 2 died: .*killed by `ray.kill`"):
        pool.generate([chat(q) for q in QUESTIONS], GenParams(temperature=0.0, max_tokens=64))
    assert time.monotonic() - start < 30

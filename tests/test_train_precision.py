"""The trainers' precision and memory settings on the tiny random Llama: ``dtype`` (bf16 autocast
on CUDA, float32 on the CPU), ``gradient_checkpointing``, the float32 scalar head, and models freed
when a trainer returns. The CUDA tests are marked ``gpu``; bf16 autocast also runs on the CPU,
which is how the mixed-precision path is checked here."""

from __future__ import annotations

import gc
import json
import math
import weakref
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from factory.config import ConfigError, RunConfig, load_config
from factory.layout import RunLayout
from factory.train import ppo, sft
from factory.train import reward as R
from factory.train.models import ScalarModel, load_causal_lm, load_tokenizer
from factory.train.precision import autocast, compute_dtype, float32_logits
from factory.train.settings import PPOConfig, RewardConfig, SFTConfig
from tests.test_train_reward import make_prefs, write_prefs
from tests.test_train_sft import make_cfg as sft_cfg

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models


@pytest.fixture(scope="module")
def rm_dir(tiny_model: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-rm")
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(1)
    ScalarModel.from_pretrained(tiny_model, CPU, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppo-prompts") / "prompts.jsonl"
    topics = ["tea", "rain", "maps", "bread", "owls", "clocks", "snow", "bikes"]
    path.write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n" for t in topics))
    return path


def rm_cfg(out: Path, tiny_model: Path, pairs: Path, *extra: str) -> RunConfig:
    return load_config(None, [f"output_dir={out}", "name=r", f"rm.model={tiny_model}", f"rm.pairs={pairs}",
                              "rm.device=cpu", "rm.batch_size=4", "rm.max_length=64", "rm.lr=1e-3", *extra])


def ppo_cfg(out: Path, tiny_model: Path, rm_dir: Path, prompts: Path, **fields) -> RunConfig:
    settings = dict(policy=str(tiny_model), reward_model=rm_dir, prompts=prompts, steps=2, batch_size=2,
                    mini_batch_size=2, ppo_epochs=1, response_length=6, max_prompt_length=40, eval_prompts=2,
                    eval_every=10, checkpoint_every=10, device="cpu", lr=1e-3) | fields
    return RunConfig(name="p", output_dir=out, ppo=settings)


def quiet(*_, **__) -> None:
    pass


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, PPOConfig])
def test_precision_settings_are_validated(cls):
    default = cls()
    assert default.dtype == "auto" and default.gradient_checkpointing is False
    assert cls(dtype="bfloat16", gradient_checkpointing=True).dtype == "bfloat16"
    for bad in ({"dtype": "float16"}, {"dtype": "bf16"}, {"dtype": None}, {"gradient_checkpointing": "sometimes"}):
        with pytest.raises(ValidationError):
            cls(**bad)
    for name in ("dtype", "gradient_checkpointing"):
        assert len(cls.model_fields[name].description) > 40


def test_precision_settings_in_a_run_config(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "sft.dtype=bfloat16", "rm.gradient_checkpointing=true",
                             "ppo.dtype=float32"])
    assert (cfg.sft.dtype, cfg.rm.gradient_checkpointing, cfg.ppo.dtype) == ("bfloat16", True, "float32")
    with pytest.raises(ConfigError, match="dtype"):
        load_config(None, [f"output_dir={tmp_path}", "rm.dtype=half"])


def test_a_checkpoint_resumes_in_another_precision(tmp_path, tiny_model):
    """Like the device, precision and checkpointing are not part of a checkpoint's fingerprint: a
    run checkpointed on a laptop in float32 resumes on a GPU in bf16 (here: bf16 on the CPU)."""
    import shutil

    run_cfg = sft_cfg(tmp_path, tiny_model, epochs=1)
    sft.run_sft(run_cfg.sft, RunLayout.of(run_cfg), echo=quiet)
    shutil.rmtree(tmp_path / "outputs" / "run" / "sft" / "model")  # as if killed before the model was saved
    said: list[str] = []
    run_cfg = sft_cfg(tmp_path, tiny_model, epochs=1, dtype="bfloat16", gradient_checkpointing=True)
    sft.run_sft(run_cfg.sft, RunLayout.of(run_cfg), echo=said.append)
    assert "resuming" in said[0]
    assert (tmp_path / "outputs" / "run" / "sft" / "model" / "config.json").is_file()


def test_auto_is_bf16_on_cuda_and_float32_on_the_cpu():
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert compute_dtype("auto", cuda) == torch.bfloat16 and compute_dtype("auto", CPU) == torch.float32
    assert compute_dtype("float32", cuda) == torch.float32 and compute_dtype("bfloat16", CPU) == torch.bfloat16
    # float32 is no autocast at all: the CPU runs exactly the ops it ran before the setting existed.
    assert autocast("auto", CPU) is nullcontext and autocast("float32", cuda) is nullcontext
    a = torch.randn(4, 4)
    with autocast("bfloat16", CPU)():
        assert (a @ a).dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32


# -- float32 where it matters -------------------------------------------------------------------


def test_ppo_logits_are_float32_products_under_bf16(tiny_model):
    """Under bf16 autocast the LM head would round logits to bf16 (spacing ~0.125 at 20-30), noise
    in every PPO ratio; float32_logits runs it in float32, and run_ppo applies it to its policy."""
    tok = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), CPU, tok).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        with autocast("bfloat16", CPU)():
            rounded = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids).last_hidden_state
        with autocast("bfloat16", CPU)():
            hidden_bf16 = model.model(input_ids=ids).last_hidden_state
        float32_logits(model)
        with autocast("bfloat16", CPU)():
            exact = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    assert rounded.dtype == torch.bfloat16 and exact.dtype == torch.float32
    # the head's product is the float32 one of the (bf16-computed) hidden states
    want = hidden_bf16.float() @ model.get_output_embeddings().weight.T
    assert torch.allclose(exact, want, atol=1e-5)
    # without autocast the head does what it always did
    assert plain.dtype == torch.float32 and torch.allclose(plain, hidden @ model.get_output_embeddings().weight.T,
                                                           atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ppo_runs_its_lm_heads_in_float32_under_bf16(tmp_path, tiny_model, rm_dir, prompts, monkeypatch, dtype):
    patched = []
    monkeypatch.setattr(ppo, "float32_logits", lambda m: patched.append(m) or float32_logits(m))
    run_cfg = ppo_cfg(tmp_path, tiny_model, rm_dir, prompts, dtype=dtype, steps=1)
    ppo.run_ppo(run_cfg.ppo, RunLayout.of(run_cfg), echo=quiet)
    # bf16: the policy and its frozen reference copy (two models); float32 (the CPU's auto): none
    assert len(patched) == (2 if dtype == "bfloat16" else 0)




def test_scalar_head_stays_float32_under_bf16_autocast(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = ScalarModel.from_pretrained(tiny_model, CPU, tok).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        exact = model.token_scores(ids, mask)
        with autocast("bfloat16", CPU)():
            mixed = model.token_scores(ids, mask)
            hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state.bfloat16()
            from_bf16 = model.head_scores(hidden)
        assert model.head_scores(hidden.float()).dtype == torch.float32
    # bf16 activations, a float32 head: the scores are float32 and close to the float32 ones.
    assert mixed.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert torch.allclose(mixed, exact, atol=5e-2)
    assert torch.equal(from_bf16.squeeze(-1), model.head(hidden.float()).squeeze(-1))
    # ... whereas a head left to autocast computes in bf16.
    with autocast("bfloat16", CPU)():
        assert model.head(hidden.float()).dtype == torch.bfloat16


def test_models_load_in_float32_whatever_the_dtype(tiny_model):
    """Master weights: autocast computes in bf16 from float32 weights, which AdamW updates."""
    tok = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), CPU, tok)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_autocast_trains_every_trainer_on_the_cpu(tmp_path, tiny_model, rm_dir, prompts):
    """dtype = bfloat16 runs the mixed-precision path (as on CUDA) on the CPU: finite losses, changed
    weights, saved in float32."""
    start = load_file(str(tiny_model / "model.safetensors"))

    cfg = sft_cfg(tmp_path, tiny_model, epochs=2, dtype="bfloat16")
    summary = sft.run_sft(cfg.sft, RunLayout.of(cfg), echo=quiet)
    assert math.isfinite(summary["train_loss"])
    after = load_file(str(cfg.run_dir / "sft" / "model" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in after.values())
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])

    pairs = write_prefs(tmp_path / "prefs.jsonl", make_prefs())
    for share in ("true", "false"):  # the packed path's additive mask, and the plain path
        rm = rm_cfg(tmp_path / f"rm-{share}", tiny_model, pairs, "rm.dtype=bfloat16", f"rm.share_prompt={share}")
        summary = R.run_reward(rm.rm, RunLayout.of(rm), echo=quiet)
        assert math.isfinite(summary["bias"]) and summary["accuracy"] is not None
        rows = [json.loads(line) for line in (rm.run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
        head = load_file(str(rm.run_dir / "rm" / "model" / "scalar_head.safetensors"))
        assert head["weight"].dtype == torch.float32

    pc = ppo_cfg(tmp_path, tiny_model, rm_dir, prompts, dtype="bfloat16")
    ppo.run_ppo(pc.ppo, RunLayout.of(pc), echo=quiet)
    rows = [json.loads(line) for line in (pc.run_dir / "policy" / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        assert all(math.isfinite(r[k]) for k in ("loss/policy", "loss/value", "objective/kl", "objective/entropy"))
        assert r["val/ratio"] == pytest.approx(1.0, abs=0.05)  # bf16 rounding, not a different policy
    policy = load_file(str(pc.run_dir / "policy" / "checkpoint" / "policy.safetensors"))
    assert policy["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"], policy["model.layers.0.mlp.up_proj.weight"])


# -- gradient checkpointing ---------------------------------------------------------------------


@pytest.fixture
def mlp_calls(monkeypatch):
    """Counts the decoder MLPs' forward calls: checkpointing runs each again in the backward pass."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = [0]
    forward = LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    return calls


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def same(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


@pytest.mark.parametrize("lora", [0, 4])
def test_gradient_checkpointing_sft_gives_the_same_weights(tmp_path, tiny_model, mlp_calls, lora):
    runs = {}
    for on in (False, True):
        mlp_calls[0] = 0
        cfg = sft_cfg(tmp_path, tiny_model, name=f"gc{on}", epochs=1, gradient_checkpointing=on,
                      lora={"r": lora, "alpha": 8})
        summary = sft.run_sft(cfg.sft, RunLayout.of(cfg), echo=quiet)
        assert math.isfinite(summary["train_loss"])
        runs[on] = (mlp_calls[0], weights(cfg.run_dir / "sft" / "model"))
    # 2 steps x 2 layers: one forward each without checkpointing, a second in the backward with it.
    assert runs[False][0] == 4 and runs[True][0] == 8
    assert same(runs[False][1], runs[True][1])
    assert not same(runs[True][1], weights(tiny_model))  # it trained (with LoRA: the merged adapters)


def test_gradient_checkpointing_rm_gives_the_same_weights(tmp_path, tiny_model, mlp_calls):
    pairs = write_prefs(tmp_path / "prefs.jsonl", make_prefs())
    runs = {}
    for on in ("false", "true"):
        mlp_calls[0] = 0
        cfg = rm_cfg(tmp_path / on, tiny_model, pairs, f"rm.gradient_checkpointing={on}", "rm.held_out=0")
        R.run_reward(cfg.rm, RunLayout.of(cfg), echo=quiet)
        final = cfg.run_dir / "rm" / "model"
        runs[on] = (mlp_calls[0], weights(final) | weights(final, "scalar_head.safetensors"))
    assert runs["true"][0] > runs["false"][0]  # recomputed in the backward passes
    assert same(runs["false"][1], runs["true"][1])


def test_gradient_checkpointing_ppo_with_lora_gives_the_same_weights(tmp_path, tiny_model, rm_dir, prompts,
                                                                    mlp_calls):
    runs = {}
    for on in (False, True):
        mlp_calls[0] = 0
        cfg = ppo_cfg(tmp_path / str(on), tiny_model, rm_dir, prompts, gradient_checkpointing=on,
                      lora={"r": 4, "alpha": 8})
        ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=quiet)
        ckpt = cfg.run_dir / "policy" / "checkpoint"
        rows = [json.loads(line) for line in (cfg.run_dir / "policy" / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["loss/value"]) for r in rows[1:])
        runs[on] = (mlp_calls[0], weights(ckpt, "policy.safetensors") | weights(ckpt, "value.safetensors"))
    assert runs[True][0] > runs[False][0]
    assert same(runs[False][1], runs[True][1])
    lora_b = [v for k, v in runs[True][1].items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the adapters got gradients through the checkpoints


# -- memory -------------------------------------------------------------------------------------


@pytest.fixture
def no_automatic_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_trainers_free_their_models_when_they_return(tmp_path, tiny_model, rm_dir, prompts, monkeypatch,
                                                     no_automatic_gc):
    """A trainer's frame, and with it its models and optimiser, can outlive the call in a reference
    cycle: a library that keeps a caught exception keeps its traceback, whose frames lead back (f_back)
    to the trainer's. transformers' lazy imports do this on a process's first model load; here the
    loader does it on every load. Reference counting alone then frees nothing until the next garbage
    collection (switched off here, as it may not come for a while); a trainer collects as it returns."""
    loaded: list[weakref.ref] = []

    def spy(load):
        def loading(*args, **kwargs):
            try:
                raise LookupError("not in the lazy-import table yet")
            except LookupError as e:
                e.kept = e  # a cycle that holds the traceback: this frame, and the trainer's behind it
            model = load(*args, **kwargs)
            loaded.append(weakref.ref(model))
            return model
        return loading

    monkeypatch.setattr(sft, "load_causal_lm", spy(sft.load_causal_lm))
    monkeypatch.setattr(ppo, "load_causal_lm", spy(ppo.load_causal_lm))
    monkeypatch.setattr(ScalarModel, "from_pretrained", classmethod(spy(ScalarModel.from_pretrained.__func__)))

    run_cfg = sft_cfg(tmp_path, tiny_model, epochs=1, lora={"r": 4, "alpha": 8})
    sft.run_sft(run_cfg.sft, RunLayout.of(run_cfg), echo=quiet)
    run_cfg = rm_cfg(tmp_path / "rm", tiny_model, write_prefs(tmp_path / "p.jsonl", make_prefs()))
    R.run_reward(run_cfg.rm, RunLayout.of(run_cfg), echo=quiet)
    run_cfg = ppo_cfg(tmp_path, tiny_model, rm_dir, prompts)
    ppo.run_ppo(run_cfg.ppo, RunLayout.of(run_cfg), echo=quiet)
    assert len(loaded) == 5  # sft's model, rm's, ppo's policy, reward and value models
    assert [r() is None for r in loaded] == [True] * 5


# -- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_auto_is_bf16_autocast_on_float32_weights(tiny_model):
    cuda = torch.device("cuda")
    tok = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), cuda, tok)
    scalar = ScalarModel.from_pretrained(tiny_model, cuda, tok)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
    ids = torch.tensor([[5, 6, 7, 8]], device=cuda)
    with torch.no_grad(), autocast("auto", cuda)():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16  # bf16 compute
        assert scalar.token_scores(ids, torch.ones_like(ids)).dtype == torch.float32  # float32 head


def allocated() -> int:
    """CUDA memory held by tensors, less cuBLAS's workspaces (kept per stream after the first matmul)."""
    torch.cuda.synchronize()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    return torch.cuda.memory_allocated()


@pytest.mark.gpu
@needs_cuda
def test_cuda_trainers_in_bf16_free_the_gpu(tmp_path, tiny_model, rm_dir, prompts):
    before = allocated()
    run_cfg = sft_cfg(tmp_path, tiny_model, epochs=2, device="cuda")
    summary = sft.run_sft(run_cfg.sft, RunLayout.of(run_cfg), echo=quiet)
    assert math.isfinite(summary["train_loss"])
    rm = rm_cfg(tmp_path / "rm", tiny_model, write_prefs(tmp_path / "p.jsonl", make_prefs()), "rm.device=cuda",
                "rm.dtype=auto")
    assert math.isfinite(R.run_reward(rm.rm, RunLayout.of(rm), echo=quiet)["bias"])
    run_cfg = ppo_cfg(tmp_path, tiny_model, rm_dir, prompts, device="cuda")
    ppo.run_ppo(run_cfg.ppo, RunLayout.of(run_cfg), echo=quiet)
    # Nothing left: the tiny model's weights alone are 6.3 MB (its 49k x 32 embedding), its AdamW state twice that.
    assert allocated() - before < 2**20

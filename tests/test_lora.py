"""LoRA's products fused into the base layer's output (dpo_lib.core.lora.fuse_lora_products): the
same outputs and gradients as peft's own forward, which is the independent path here."""
import pytest
import torch

from dpo_lib.core.config import load_config
from dpo_lib.core.lora import add_lora, fuse_lora_products
from dpo_lib.core.models import load_model


def lora_model(quantization: str):
    cfg = load_config("tiny", overrides={"model.quantization": quantization,
                                         "model.fused_lora": False})
    model = add_lora(load_model(cfg), cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():                 # B != 0, so the adapter's products count
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits                                   # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.requires_grad}


def unfuse(model):
    for module in model.modules():
        vars(module).pop("forward", None)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fused_lora_is_peft_lora(quantization):
    model = lora_model(quantization)
    ids = torch.randint(5, 200, (3, 17), generator=torch.Generator().manual_seed(1))
    peft_logits, peft_grads = loss_and_grads(model, ids)
    changed = fuse_lora_products(model)
    assert changed == sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert changed > 0 and fuse_lora_products(model) == 0                 # once only
    fused_logits, fused_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(fused_logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == peft_grads.keys()
    for name in peft_grads:
        assert peft_grads[name].abs().max() > 0, name                     # every LoRA matrix learns
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_without_grad_and_with_the_adapter_off_peft_computes():
    model = lora_model("nf4")
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    fuse_lora_products(model)
    with torch.no_grad():                  # the reference pass, evaluation, generation: peft's own
        assert torch.equal(model(input_ids=ids).logits, peft_logits)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base_logits)
    unfuse(model)


def test_training_models_are_fused_by_default_and_the_key_turns_it_off():
    on = add_lora(load_model(load_config("tiny")), load_config("tiny"))
    off_cfg = load_config("tiny", overrides={"model.fused_lora": False})
    off = add_lora(load_model(off_cfg), off_cfg)
    assert any("forward" in vars(m) for m in on.modules())
    assert not any("forward" in vars(m) for m in off.modules())


def test_only_plain_and_4bit_layers_are_fused():
    cfg = load_config("tiny", overrides={"model.quantization": "int8"})
    int8 = add_lora(load_model(cfg), cfg)          # bitsandbytes' Linear8bitLt: peft's forward
    assert not any("forward" in vars(m) for m in int8.modules())


def test_the_fused_output_takes_in_place_operations():
    model = lora_model("nf4")
    fuse_lora_products(model)
    layer = next(m for m in model.modules() if "forward" in vars(m))
    x = torch.randn(2, 5, layer.get_base_layer().in_features, requires_grad=True)
    y = layer(x)
    y.mul_(2.0).sum().backward()                   # an architecture that scales in place
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_loaded_trainable_adapter_is_fused(tmp_path):
    from dpo_lib.core.lora import load_trainable_adapter

    cfg = load_config("tiny")
    add_lora(load_model(cfg), cfg).save_pretrained(tmp_path / "adapter")
    loaded = load_trainable_adapter(load_model(cfg), cfg, tmp_path / "adapter")
    assert any("forward" in vars(m) for m in loaded.modules())

"""LoRA on a (quantized) causal LM: the trainable adapter, gradient checkpointing, bitsandbytes'
trainable 4-bit layout, and the reference pass on the same weights with the adapter off.

:func:`add_lora` wraps a model from :func:`dpo_lib.core.models.load_model` in a peft adapter on
every linear layer of the blocks (``B`` starts at zero, so the wrapped model computes what the base
does until the first step); :func:`load_trainable_adapter` continues from a saved one (an SFT
run's); :func:`reference_mode` disables the adapter for the reference log-probs, so one copy of
the weights serves as policy and reference.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .config import Config


def is_quantized(model) -> bool:
    """Whether bitsandbytes loaded the model in 4 or 8 bits."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or
                getattr(model, "is_loaded_in_8bit", False))


def keep_trainable_4bit_layout(model) -> int:
    """Keep bitsandbytes' 4-bit weights in the standard (trainable) layout; returns how many layers.

    On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit`` rewrites its packed weight into an
    inference-only layout on the first forward in eval mode without grad (a reference or
    evaluation pass), rounding the fp32 absmax scales to bf16 and computing in bf16. Training
    forwards afterwards fail, and dequantized weights differ from the stored ones.
    :func:`load_model` calls this on every 4-bit model on CPU, so the rewrite never happens; on a
    model where it already did, this undoes the layout but cannot restore the rounded scales
    (it warns: reload the model). No effect on CUDA.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        state = getattr(layer.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            import warnings

            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            warnings.warn("bitsandbytes had repacked this 4-bit layer for CPU inference and "
                          "rounded its scales to bf16; undone, but the scales stay rounded. "
                          "Reload the model for the exact weights.", stacklevel=2)

            layer.weight.data, layer.weight.quant_state = \
                _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    return len(layers)


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Switch activation checkpointing on or off (recompute each layer in the backward pass).

    Uses non-reentrant checkpointing, which needs no input that requires grad, so it also works
    when the base model is frozen and only LoRA adapters train.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enabled:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    elif is_checkpointing(base):
        (getattr(base, "activation_checkpointing_disable", None)
         or base.gradient_checkpointing_disable)()


def is_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = getattr(base, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))


def add_lora(model, cfg: Config | None = None, r: int | None = None, alpha: int | None = None,
             dropout: float | None = None, gradient_checkpointing: bool | None = None):
    """Wrap ``model`` in a peft ``PeftModel`` with a trainable LoRA adapter on every linear layer
    of the transformer blocks; the output head (``lm_head`` / ``embed_out``) stays frozen.

    ``r``, ``alpha``, ``dropout`` and ``gradient_checkpointing`` default to ``cfg.model``'s
    ``lora_r``, ``lora_alpha``, ``lora_dropout`` and ``gradient_checkpointing`` (8, 16, 0.0,
    False without a cfg). ``cfg.model.lora_target_modules``: module names to adapt (e.g.
    internlm2's fused ``wqkv``, ``wo``, ``w1``, ``w2``, ``w3``); null means every linear layer. A 4/8-bit model first goes through peft's
    ``prepare_model_for_kbit_training`` (every base weight frozen; norms, embeddings and head cast
    to fp32), and its 4-bit layers keep their trainable layout (see
    :func:`keep_trainable_4bit_layout`). The adapter's ``B`` starts at zero, so the wrapped model computes exactly what the
    base model does until the first optimizer step. With ``cfg.model.fused_lora`` (the default)
    its training forwards go through :func:`fuse_lora_products`.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings = cfg.model if cfg is not None else {}
    r = settings.get("lora_r", 8) if r is None else r
    alpha = settings.get("lora_alpha", 16) if alpha is None else alpha
    dropout = settings.get("lora_dropout", 0.0) if dropout is None else dropout
    if gradient_checkpointing is None:
        gradient_checkpointing = bool(settings.get("gradient_checkpointing", False))
    if hasattr(model, "peft_config"):
        raise ValueError("add_lora: the model already has a LoRA adapter")
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_trainable_4bit_layout(model)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    set_gradient_checkpointing(model, gradient_checkpointing)
    targets = settings.get("lora_target_modules") or "all-linear"
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if settings.get("fused_lora", True):
        fuse_lora_products(model)
    return model


def load_trainable_adapter(base, cfg: Config, adapter: Path):
    """``base`` with a saved LoRA adapter (an SFT run's), trainable: prepared as
    :func:`add_lora` prepares a fresh one (4-bit layouts, frozen base, gradient checkpointing)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    if is_quantized(base):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        keep_trainable_4bit_layout(base)
    set_gradient_checkpointing(base, cfg.model.gradient_checkpointing)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    if cfg.model.fused_lora:
        fuse_lora_products(model)
    return model


@contextmanager
def reference_mode(model):
    """The reference pass of DPO on the same weights: LoRA adapters disabled, dropout off, no grad.

    Inside ``with reference_mode(model):`` the peft model computes the frozen base model's
    outputs, so one copy of the (quantized) weights serves as both policy and reference. The
    training mode is restored on exit.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference_mode needs a peft model with a LoRA adapter (see add_lora); "
                        "a plain model is its own reference")
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# LoRA's products fused into the base layer's output (issue 29): the same function, fewer passes
# --------------------------------------------------------------------------------------------

def _is_linear4bit(layer) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(layer, bnb.nn.Linear4bit)


def _base_weight(layer, dtype) -> torch.Tensor:
    """``[out, in]``: a frozen base layer's weight in ``dtype``; a 4-bit one dequantized as
    bitsandbytes' matmul does it on a CPU (``dequantize_4bit``, then a plain linear) and in its
    backward pass everywhere."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, state).to(dtype)
    return weight.to(dtype)


class _LoRALinear(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T``: a linear layer with its frozen weight ``W`` ``[out, in]``
    (4-bit or not) and a LoRA adapter ``A`` ``[r, in]``, ``B`` ``[out, r]``, scaling ``s``.

    peft computes the same sum as the base output, a copy of it, the two thin products, a
    multiplication by ``s`` and an addition, each a pass over ``[T, out]``; here the second thin
    product adds itself into the base output (``addmm_`` with ``alpha = s``), and in the backward
    pass LoRA's share of ``dL/dx`` adds itself into the base's. Shapes: ``x`` ``[..., in]``,
    ``y`` ``[..., out]``; ``T`` is the product of the leading dimensions. Backward:
    ``g = dy B`` ``[T, r]``, ``dx = dy W + s g A``, ``dA = s g^T x``, ``dB = s dy^T (x A^T)``."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, layer, scaling):
        rows = x.reshape(-1, x.shape[-1])                                 # [T, in]
        low = rows @ lora_a.t()                                           # [T, r]
        weight = _base_weight(layer, x.dtype)                             # [out, in]
        # a tensor of its own, not a view, so that later in-place operations on it are allowed
        out = x.new_empty(*x.shape[:-1], weight.shape[0])                 # [..., out]
        flat = out.view(-1, weight.shape[0])                              # [T, out]
        if layer.bias is None:
            torch.mm(rows, weight.t(), out=flat)
        else:
            torch.addmm(layer.bias, rows, weight.t(), out=flat)
        flat.addmm_(low, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, low, lora_a, lora_b)
        ctx.layer, ctx.scaling, ctx.x_shape = layer, scaling, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, low, lora_a, lora_b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])                   # [T, out]
        through_b = grad @ lora_b                                         # [T, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _base_weight(ctx.layer, grad.dtype)          # [T, in]
            grad_x.addmm_(through_b, lora_a, alpha=ctx.scaling)
            grad_x = grad_x.view(ctx.x_shape)
        grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(through_b.t(), rows).mul_(ctx.scaling)      # [r, in]
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(grad.t(), low).mul_(ctx.scaling)            # [out, r]
        return grad_x, grad_a, grad_b, None, None


def _fusable(layer, x, args, kwargs) -> str | None:
    """The one active adapter's name where :class:`_LoRALinear` computes what peft's forward does
    (a forward with grad, plain LoRA without dropout or a bias of its own, the adapter on and not
    merged, no autocast, one dtype, a frozen base that is a plain ``nn.Linear`` or a 4-bit layer on
    the CPU computing in the input's dtype), else None."""
    if not torch.is_grad_enabled() or args or kwargs or layer.disable_adapters or layer.merged \
            or torch.is_autocast_enabled():
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A \
            or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False):
        return None
    base = layer.get_base_layer()
    if _is_linear4bit(base):
        if x.device.type != "cpu" or getattr(base.weight, "quant_state", None) is None \
                or base.compute_dtype not in (None, x.dtype):
            return None
    elif type(base) is not torch.nn.Linear:                 # int8 and other quantized layers
        return None
    bias = base.bias
    if base.weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if x.dtype != layer.lora_A[name].weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    return name


def _fused_forward(self, x, *args, **kwargs):
    """A peft LoRA layer's forward through :class:`_LoRALinear` where that is the same function,
    peft's own (the class's ``forward``) otherwise."""
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    return _LoRALinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight,
                             self.get_base_layer(), self.scaling[name])


def fuse_lora_products(model) -> int:
    """Make each peft LoRA linear layer of ``model`` compute its training forward through
    :class:`_LoRALinear` where that is the same function (:func:`_fusable`); peft's forward
    otherwise, and always without grad, so the reference pass, evaluation and generation keep
    peft's arithmetic (and the reference cache its keys). Returns the number of layers changed.
    The same numbers to float rounding (the sum is taken in another order):
    ``tests/test_lora.py`` holds outputs and gradients to peft's."""
    import types

    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or "forward" in vars(module):
            continue
        base = module.get_base_layer()
        if type(base) is torch.nn.Linear or _is_linear4bit(base):     # not int8's Linear8bitLt
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed

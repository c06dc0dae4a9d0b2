"""Predict the peak memory of one QLoRA DPO training step, from the model's shapes alone.

``estimate_memory("pythia-2.8b", quantization="nf4", double_quant=True, lora_r=8, batch=4,
seq_len=512, gradient_checkpointing=True)`` returns a :class:`MemoryEstimate` with bytes for

* ``weights``: the linear layers of the transformer blocks in the chosen format (4-bit codes plus
  their scales, see :func:`dpo_lib.lessons.quantization.bytes_per_parameter`); everything else
  (embeddings, output head, norms, biases) in fp32 when quantized (peft's
  ``prepare_model_for_kbit_training`` upcasts them), else in the weight dtype;
* ``lora``: the adapter's parameters, gradients and AdamW's two moments, all fp32: 16 bytes per
  LoRA parameter, ``r * (in + out)`` per adapted linear layer;
* ``activations``: tensors the forward pass keeps for the backward pass, in the compute dtype.
  Per layer and token, a GPT-NeoX block keeps about ``9 h + 2 i`` values (the block input, two
  norm outputs, the fused q/k/v output, rotated q and k, the attention output, the MLP's
  up-projection and its GELU) and a Llama block about ``7 h + 3 kv + 4 i`` (``h`` hidden size,
  ``i`` MLP width, ``kv`` key/value width). Attention runs through PyTorch's fused
  scaled-dot-product kernels, which keep no ``T x T`` matrix. With gradient checkpointing, each
  layer keeps only its input (``h`` per token) and one layer's full set is rebuilt at a time in
  the backward pass. Plus one dequantized weight matrix, the largest, as the 4-bit matmul's
  workspace;
* ``logits``: the output layer's part. Plain (``chunked_head=False``): the ``[sequences, T, vocab]``
  logits in the compute dtype, which the log-prob function keeps for the backward pass, and their
  gradient of the same size, plus one fp32 chunk of :data:`dpo_lib.core.logps.CHUNK_ELEMENTS` logits
  at a time in each direction. Chunked (``train.chunked_head``): no logits tensor; the final
  hidden states of the answer tokens (a ``[M, H]`` copy) and one chunk's fp32 logits, their
  gradient and its copy in the weights' dtype: the largest single item for short models with big
  vocabularies becomes a constant. On a CPU (``cpu=True``) the chunked head also keeps the fp32
  softmax of its first chunks for the backward pass, up to
  :data:`dpo_lib.core.logps.SAVED_SOFTMAX_ELEMENTS` (there the product it saves is what is scarce).

DPO scores chosen and rejected responses in one forward pass, so ``batch`` preference pairs make
``2 * batch`` sequences (``pairs=False``: ``batch`` is the number of sequences); with
``shared_prompt`` each pair is one packed sequence of ``2 * seq_len - prompt_len`` tokens
(:class:`dpo_lib.core.layouts.PackedLayout`). The trainer computes the reference log-probs once, before training
(:mod:`dpo_lib.training.reference`), so the reference pass adds nothing to a step's peak. Not included: the CUDA context (about 0.3-0.6 GB, outside PyTorch's
``max_memory_allocated``), allocator fragmentation, the Python process itself (CPU), the data.
:func:`fits` adds a stated headroom for those. ``benchmarks/memory.py`` checks the prediction
against the measured peak of the trainer's own step (:func:`dpo_lib.training.step.training_step`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..core.logps import CHUNK_ELEMENTS, SAVED_SOFTMAX_ELEMENTS
from .quantization import bytes_per_parameter

GB = 1e9
#: Bytes of each weight/compute dtype name.
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of one training step, by part (``total`` is their sum)."""
    weights: int
    lora: int
    activations: int
    logits: int
    total: int = 0

    def __post_init__(self):
        self.total = self.weights + self.lora + self.activations + self.logits

    def as_gb(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) / GB for f in fields(self)}

    def __str__(self):
        return "  ".join(f"{name} {value:.2f} GB" for name, value in self.as_gb().items())


@dataclass
class ModelShapes:
    """What the estimate needs from a model: linear layer shapes and the rest's size."""
    model_type: str
    hidden: int
    intermediate: int
    kv_width: int
    layers: int
    vocab: int
    linear: list            # (in_features, out_features) of each linear layer in the blocks
    other_params: int       # embeddings, output head (counted once if tied), norms, biases

    @property
    def linear_params(self) -> int:
        return sum(i * o for i, o in self.linear)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


def model_shapes(model) -> ModelShapes:
    """Shapes of a name in :data:`dpo_lib.core.models.ARCHITECTURES`, a transformers config, or a
    loaded model (built on the ``meta`` device from its config: no memory, no weights)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    from ..core.models import architecture_config

    if isinstance(model, str):
        config = architecture_config(model)
    elif isinstance(model, PretrainedConfig):
        config = model
    elif hasattr(model, "config"):
        config = model.config
    else:
        raise TypeError(f"model_shapes needs an architecture name, a config or a model, got "
                        f"{type(model).__name__}")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    head = skeleton.get_output_embeddings()
    linear, seen, other = [], set(), 0
    for module in skeleton.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear.append((module.in_features, module.out_features))
            seen.add(id(module.weight))
    for parameter in skeleton.parameters():  # .parameters() yields a tied weight once
        if id(parameter) not in seen:
            other += parameter.numel()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShapes(model_type=config.model_type, hidden=config.hidden_size,
                       intermediate=config.intermediate_size,
                       kv_width=config.hidden_size // heads * kv_heads,
                       layers=config.num_hidden_layers, vocab=config.vocab_size,
                       linear=linear, other_params=other)


def activation_values_per_token(shapes: ModelShapes) -> int:
    """Values one block keeps per token for its backward pass (see the module docstring)."""
    h, i, kv = shapes.hidden, shapes.intermediate, shapes.kv_width
    if shapes.model_type == "gpt_neox":
        return 9 * h + 2 * i
    # Llama-style (SmolLM2, Mistral, ...): gated MLP keeps gate, up, act(gate) and their product.
    return 7 * h + 3 * kv + 4 * i


def estimate_memory(model, quantization: str = "nf4", double_quant: bool = True,
                    lora_r: int = 8, batch: int = 4, seq_len: int = 512,
                    gradient_checkpointing: bool = False, compute_dtype: str = "bfloat16",
                    pairs: bool = True, chunked_head: bool = False, shared_prompt: bool = False,
                    prompt_len: int = 0, cpu: bool = False) -> MemoryEstimate:
    """Predicted peak memory of one LoRA training step (bytes, by part).

    ``model``: an architecture name, config or model (see :func:`model_shapes`).
    ``quantization``: ``nf4``/``fp4`` (with ``double_quant``), ``int8``, ``bf16``/``fp16``
    (16-bit weights), ``fp32``/``none``. ``compute_dtype``: the dtype of activations and logits
    (``float32`` on CPU, ``bfloat16`` on recent GPUs). ``batch`` counts preference pairs
    (``pairs=True``: ``2 * batch`` sequences of ``seq_len`` tokens) or sequences.
    ``chunked_head``, ``shared_prompt``: the trainer's ``train.chunked_head`` and
    ``train.shared_prompt``; ``prompt_len``: the prompt's tokens in each sequence (labels -100;
    the packed layout holds them once per pair, the chunked head skips them). ``cpu``: the step
    runs on a CPU (the chunked head keeps part of its softmax, see the module's docstring).
    """
    shapes = model if isinstance(model, ModelShapes) else model_shapes(model)
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown compute dtype {compute_dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if min(lora_r, batch, seq_len) < 0 or batch == 0 or seq_len == 0:
        raise ValueError("batch and seq_len must be positive, lora_r >= 0")
    act_bytes = DTYPE_BYTES[compute_dtype]
    quantized = quantization in ("nf4", "fp4", "int8")
    if quantization in ("nf4", "fp4"):
        fmt = quantization + ("+dq" if double_quant else "")
    else:
        fmt = {"none": compute_dtype}.get(quantization, quantization)
    other_bytes = 4 if quantized else bytes_per_parameter(fmt)
    weights = shapes.linear_params * bytes_per_parameter(fmt) + shapes.other_params * other_bytes

    lora = 16 * lora_r * sum(i + o for i, o in shapes.linear)

    if not 0 <= prompt_len < seq_len:
        raise ValueError("prompt_len must be in [0, seq_len)")
    if shared_prompt and not pairs:
        raise ValueError("shared_prompt packs pairs: it needs pairs=True")
    sequences = 2 * batch if pairs else batch
    answer_tokens = sequences * (seq_len - prompt_len)
    tokens = batch * (2 * seq_len - prompt_len) if shared_prompt else sequences * seq_len
    per_layer = activation_values_per_token(shapes) * tokens * act_bytes
    if gradient_checkpointing:
        activations = shapes.layers * shapes.hidden * tokens * act_bytes + per_layer
    else:
        activations = shapes.layers * per_layer
    if quantized:  # the 4/8-bit matmul dequantizes one weight matrix at a time
        activations += max(i * o for i, o in shapes.linear) * act_bytes

    if chunked_head:   # one chunk of rows through the head: fp32 logits, their gradient, a copy
        chunk = min(CHUNK_ELEMENTS // shapes.vocab * shapes.vocab, answer_tokens * shapes.vocab)
        logits = answer_tokens * shapes.hidden * act_bytes + chunk * (4 + 4 + act_bytes)
        if cpu:        # the softmax of the chunks that fit the budget, kept for backward
            rows = max(1, CHUNK_ELEMENTS // shapes.vocab)
            kept_rows = min(answer_tokens, SAVED_SOFTMAX_ELEMENTS // (rows * shapes.vocab) * rows)
            logits += kept_rows * shapes.vocab * 4
    else:              # logits kept for backward and their gradient; one sequence's fp32 chunk
        chunk = min(CHUNK_ELEMENTS // shapes.vocab * shapes.vocab, seq_len * shapes.vocab)
        # the packed layout also gathers the answer positions' logits out of the sequence's
        kept = tokens + (answer_tokens if shared_prompt else 0)
        logits = kept * shapes.vocab * act_bytes * 2 + chunk * 4 * 2
    if shared_prompt:  # the [B, 1, T, T] attention mask of the packed layout (boolean)
        activations += batch * (2 * seq_len - prompt_len) ** 2
    return MemoryEstimate(weights=int(weights), lora=int(lora), activations=int(activations),
                          logits=int(logits))


def random_pair_examples(pairs: int, seq_len: int, prompt_len: int, vocab: int,
                         seed: int = 0) -> list[dict]:
    """``pairs`` tokenized pairs (as :func:`dpo_lib.core.batches.tokenize_pairs` makes them) of random
    ids: a shared ``prompt_len``-token prompt and two answers filling ``seq_len`` tokens each, so
    that a batch has no padding (the worst case for memory)."""
    from ..core.batches import IGNORE_INDEX

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(pairs):
        ids = torch.randint(0, vocab, (3, seq_len), generator=generator).tolist()
        prompt = ids[0][:prompt_len]
        masked = [IGNORE_INDEX] * prompt_len
        chosen, rejected = prompt + ids[1][prompt_len:], prompt + ids[2][prompt_len:]
        examples.append({"prompt_input_ids": prompt, "chosen_input_ids": chosen,
                         "chosen_labels": masked + chosen[prompt_len:],
                         "rejected_input_ids": rejected,
                         "rejected_labels": masked + rejected[prompt_len:]})
    return examples


#: Memory a GPU run needs beyond the estimate: CUDA context and allocator fragmentation.
CUDA_CONTEXT_BYTES = 0.6 * GB
FRAGMENTATION = 0.10


def fits(budget_gb: float, model="pythia-2.8b", **kwargs) -> tuple[bool, float, MemoryEstimate]:
    """Whether a training step fits in ``budget_gb`` GB of GPU memory.

    Returns ``(fits, needed_gb, estimate)`` where ``needed = estimate.total * 1.10 + 0.6 GB``
    (fragmentation and the CUDA context, assumptions of this module, not measurements).
    ``kwargs`` go to :func:`estimate_memory`.
    """
    estimate = estimate_memory(model, **kwargs)
    needed = (estimate.total * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES) / GB
    return needed <= budget_gb, needed, estimate

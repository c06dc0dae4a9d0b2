"""dpo_lib: the library behind the dpo-quant notebooks (DPO and IPO with 4-bit QLoRA).

Four wings, each a subpackage; dependencies run one way (``tests/test_layout.py`` checks them)::

    core       what every part needs: config (the schema, profiles), errors, hub, data
               (hh-rlhf sources and splits), batches (tokenized pairs, batch order), logps
               (answer log-probs), layouts (plain and packed pairs, SFT sequences: collation
               and forward), scoring (score pairs with a model: the no-grad pass), losses,
               models (loading, quantization, LoRA), runs (a run folder's format), machine,
               progress, cli
      -> training   reference (the cached reference pass), ches (the pair filter), step (one
                    optimizer step of either stage, evaluation), checkpoints (claiming a run
                    folder, checkpoints, metrics.jsonl), train (the loop, its command line),
                    sweep (several runs)
      -> deploy     llama_runtime (llama.cpp and its converter), gguf_check (GGUF against
                    transformers), export (merge, GGUF, quantize, Space), chat, app, browser;
                    it needs core and a finished run folder, never training
    lessons    what the notebooks teach with: bundled (the project's data and its checker),
               toy (bandit problems), quantization (reference NF4), memory (the memory
               estimate), analysis (reading logs), compare (runs side by side, the statistics
               over prompts), generate (answers); it may use every other wing

An arrow reads "is used by": core imports no other wing; training and deploy import only core;
lessons import anything.
"""
__version__ = "0.1.0"

from .core.progress import silence_known_noise as _silence_known_noise

_silence_known_noise()  # three known library messages, filtered by message (see dpo_lib.core.progress)

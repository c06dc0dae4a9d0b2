"""dpo_lib: the library behind the dpo-quant notebooks (DPO and IPO with 4-bit QLoRA).

Each idea has one module, and imports run one way (``tests/test_layout.py`` walks them)::

    config      the schema of every key (dataclasses), profiles and recipes, paths
      -> hub        the Hugging Face Hub and the real hh-rlhf files
      -> data       hh-rlhf rows: sources, splits, sampling, accounting
      -> batches    tokenized pairs, collation, length-grouped batches, IGNORE_INDEX
      -> models     tokenizers, models per profile, quantization configs, LoRA
      -> logps      log-probs of answer tokens (logits or chunked output layer), PairLogps
      -> packing    chosen and rejected packed behind one prompt
      -> forward    a batch of pairs through the model; the no-grad pass over a set
      -> reference  the reference model's log-probs, computed once and cached
      -> ches       CHES: which pairs pull the chosen answer down; the pair filter
      -> losses     DPO, cDPO, IPO, RPO, SimPO and the logged metrics
      -> steps      one micro-batch of the trainer (PreferenceRows), held-out evaluation
      -> runs       a run's folder: name, checkpoints, resumption, metrics.jsonl
      -> train      the training loop and its command line
      -> analysis, compare, sweep, memory   reading logs, runs side by side, several runs,
                    the memory estimate (checked against the trainer's own step)
      -> gguf_check GGUF files against transformers (log-probs, KL, accuracies, speed)
      -> export     merge, GGUF conversion and quantization, the Space folder; its command line
                    verifies what it made with gguf_check (so the check comes first here)
      -> chat, app  serving a GGUF

    llama_runtime (the llama.cpp runtime, its converter, GGUF headers) needs only models; export,
    gguf_check and chat use it. An arrow reads "is used by": no module imports one to its right.

Besides: ``bundled`` (the project's preference set and its checker), ``quantization``
(reference NF4), ``toy`` (bandit problems), ``generate`` (answers, scores), ``browser`` (the app
in headless Chromium), ``progress`` (progress bars, known library messages), ``cli`` (the
command-line tools' one-line errors).
"""
__version__ = "0.1.0"

from .progress import silence_known_noise as _silence_known_noise

_silence_known_noise()  # three known library messages, filtered by message (see dpo_lib.progress)

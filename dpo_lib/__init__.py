"""dpo_lib: the library behind the dpo-quant notebooks (DPO and IPO with 4-bit QLoRA).

One module per concept: ``config`` (profiles), ``data`` (hh-rlhf pairs), ``bundled`` (the
project's own preference set and its checker), ``models`` (tokenizers and models per profile),
``quantization`` (reference NF4), ``memory``, ``losses``, ``packing`` (shared-prompt pairs),
``train``, ``sweep``, ``analysis``, ``generate``, ``export`` (merge, GGUF, quantize),
``gguf_check``, ``chat`` and ``app`` (serving the GGUF), ``browser`` (the app in headless
Chromium), ``compare`` (trained runs side by side on held-out pairs: accuracies, sign tests,
answers), ``progress`` (progress bars, known library messages).
"""
__version__ = "0.1.0"

from .progress import silence_known_noise as _silence_known_noise

_silence_known_noise()  # three known library messages, filtered by message (see dpo_lib.progress)

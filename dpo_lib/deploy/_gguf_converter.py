"""Runs llama.cpp's ``convert_hf_to_gguf.py`` (a subprocess of :func:`dpo_lib.deploy.export.convert_to_gguf`).

``python -m dpo_lib.deploy._gguf_converter CONVERTER_DIR PRE_TOKENIZER [converter arguments...]``

The converter runs unchanged, with its own ``gguf-py`` first on ``sys.path`` (the PyPI ``gguf``
package is older than it needs), and two adjustments for checkpoints this project writes:

* GPT-NeoX saved by transformers 5 keeps ``rotary_pct`` as ``rope_parameters.partial_rotary_factor``;
  the converter reads ``rotary_pct``, so it is copied back into the hyper-parameters it reads.
* ``PRE_TOKENIZER`` (``-`` for none) names the llama.cpp pre-tokenizer to use when the converter's
  table of known tokenizers has no entry for this one (the tiny profile's own byte-level BPE
  tokenizer splits text as GPT-2 does: ``gpt-2``).
"""
from __future__ import annotations

import runpy
import sys


def main() -> None:
    converter, pre_tokenizer, *arguments = sys.argv[1:]
    sys.path[:0] = [converter, f"{converter}/gguf-py"]
    import conversion.base as base

    known_pre_tokenizer = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return known_pre_tokenizer(self, tokenizer)
        except NotImplementedError:
            if pre_tokenizer == "-":
                raise
            return pre_tokenizer

    load_hparams = base.ModelBase.load_hparams

    def load_hparams_with_rotary_pct(dir_model, is_mistral_format):
        hparams = load_hparams(dir_model, is_mistral_format)
        rope = hparams.get("rope_parameters") or {}
        if "rotary_pct" not in hparams and "partial_rotary_factor" in rope:
            hparams["rotary_pct"] = rope["partial_rotary_factor"]
        return hparams

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    base.ModelBase.load_hparams = staticmethod(load_hparams_with_rotary_pct)
    script = f"{converter}/convert_hf_to_gguf.py"
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

"""Progress bars and library noise, decided in one place.

Every bar of ``dpo_lib`` comes from :func:`tqdm`: ``tqdm.auto`` (a widget in Jupyter, text in a
terminal) unless the environment variable ``DPO_PROGRESS`` is ``0``, which switches every bar off,
transformers' own ("Loading weights", "Writing model shards") included. ``make tutorial``,
``make notebooks`` and the test suite set ``DPO_PROGRESS=0``, so that the executed notebooks hold
no widget: a saved widget renders as a frozen ``0%`` on GitHub or any static viewer.

:func:`silence_known_noise` drops three messages that say nothing about the lesson: bitsandbytes'
"Failed to load CPU gemm_4bit_forward from kernels-community" (it would fetch faster CPU kernels
from the Hugging Face Hub, then uses its built-in path), transformers' FutureWarning that
``is_gradient_checkpointing`` is deprecated (peft still reads the old name), and transformers'
"The modules are dequantized in ..." when :func:`dpo_lib.deploy.export.merge_adapter` dequantizes the
4-bit base (the dtype it names is the one asked for). Each filter matches its message, nothing
else.
"""
from __future__ import annotations

import logging
import os
import warnings

ENV_VAR = "DPO_PROGRESS"


def enabled() -> bool:
    """False when ``DPO_PROGRESS`` is 0/false/no/off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def tqdm(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm``, switched off when :func:`enabled` is False."""
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm(*args, disable=disable or not enabled(), **kwargs)


def quiet_transformers() -> None:
    """Switch off transformers' own progress bars when :func:`enabled` is False."""
    if not enabled():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_BNB_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community"
_DEQUANTIZED = "The modules are dequantized in"
_silenced = False


def silence_known_noise() -> None:
    """Drop the three known messages (see the module docstring); idempotent."""
    global _silenced
    if _silenced:
        return
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage(_BNB_KERNELS))
    logging.getLogger("transformers.integrations.bitsandbytes").addFilter(
        _DropMessage(_DEQUANTIZED))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
    _silenced = True

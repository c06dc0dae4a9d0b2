"""dpo_lib: the library behind the dpo-quant notebooks (DPO and IPO with 4-bit QLoRA).

One module per concept: ``config`` (profiles), ``data`` (hh-rlhf pairs), ``bundled`` (the
project's own preference set and its checker), ``models`` (tokenizers and models per profile).
"""
__version__ = "0.1.0"

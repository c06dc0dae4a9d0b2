"""NF4 from first principles: a small reference quantizer that reproduces bitsandbytes exactly.

The lesson of notebook 01, written out in plain torch so that every step can be printed:

1. the NF4 code book, 16 values from quantiles of the standard normal (:func:`nf4_code_book`);
2. blockwise absmax scaling: each block of ``blocksize`` consecutive values (in row-major order)
   is divided by its largest magnitude, so it lies in ``[-1, 1]``;
3. each scaled value takes the index of the nearest code (:func:`nearest_code`);
4. two 4-bit indices share one byte, the first element in the high nibble (:func:`pack_nibbles`);
5. double quantization: the fp32 absmax values themselves are quantized to 8 bits, in blocks of
   256, after subtracting their mean (:func:`double_quantize`).

``quantize_nf4(w, 64)`` returns the same packed bytes and absmax as
``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`` (bit for bit on
bitsandbytes' CPU backend; tests/test_quantization.py asserts it). Training uses bitsandbytes
itself; this module exists to be read.
"""
from __future__ import annotations

import math

import torch

#: The outermost quantile bitsandbytes' ``create_normal_map`` uses: the code book spans
#: ``norm.ppf(0.9677083)`` = 1.848 standard deviations, scaled to 1.
NF4_OFFSET = 0.9677083

#: Storage bytes per parameter of each weight format (the quantized layers only; the 4-bit formats
#: add their absmax scales, see :func:`bytes_per_parameter`).
FORMATS = ("fp32", "bf16", "fp16", "int8", "fp4", "nf4", "nf4+dq")


def nf4_code_book(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, sorted, in ``[-1, 1]``: shape ``[16]``, float32.

    8 positive values are the normal quantiles at 8 evenly spaced probabilities from ``offset``
    down to (not including) 0.5; 7 negative values likewise from 7 probabilities; plus an exact
    zero. Dividing by the largest makes the ends exactly -1 and 1. This is bitsandbytes'
    ``create_normal_map(offset, use_extra_value=True)``, with ``torch.special.ndtri`` (the normal
    quantile function) in place of scipy's ``norm.ppf``; the probabilities are spaced in float32
    and the quantiles taken in float64, as there, so the result equals
    ``bitsandbytes.functional.get_4bit_type("nf4")`` exactly.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8, same shape as ``scaled``) of the nearest entry of the sorted ``code``.

    The decision thresholds are the midpoints between neighbouring codes (computed in float32);
    the index is the number of thresholds strictly below the value, so a value exactly on a
    midpoint takes the lower code, as bitsandbytes' ``torch.bucketize`` does.
    """
    thresholds = (code[:-1] + code[1:]) / 2
    index = torch.zeros(scaled.shape, dtype=torch.uint8)
    for threshold in thresholds:  # 15 comparisons for NF4: light on memory for big matrices
        index += scaled > threshold
    return index


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a 1-D tensor ``[n]`` blockwise into ``[-1, 1]``.

    Returns ``(scaled [n] float32, absmax [ceil(n / blocksize)] float32)``; the last block may be
    shorter. Like bitsandbytes, it multiplies by ``1 / absmax`` (not divides by ``absmax``: the two
    can differ in the last bit, which can move a value across a threshold) and clamps to [-1, 1].
    """
    flat = flat.reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    return scaled.clamp(-1, 1).reshape(-1)[:n], absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``[n]`` uint8 in 0..15 -> ``[ceil(n / 2), 1]`` uint8.

    Element ``2i`` goes in the high nibble of byte ``i``, element ``2i + 1`` in the low one; an odd
    ``n`` is padded with the code 7 (zero in NF4), as bitsandbytes pads with 0.0. The trailing
    dimension of 1 is bitsandbytes' storage shape.
    """
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_nibbles: codes must lie in 0..15")
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([7], dtype=torch.uint8)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[m, 1]`` (or ``[m]``) uint8 -> ``[n]`` uint8 codes."""
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return codes[:n]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize a float tensor of any shape ``S`` (``n`` elements, row-major blocks).

    Returns ``(packed_codes [ceil(n / 2), 1] uint8, absmax [ceil(n / blocksize)] float32)``,
    comparable with ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    quant_type="nf4")``, whose ``(out, state)`` carries the same two tensors as ``out`` and
    ``state.absmax``.
    """
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a float tensor, got {weight.dtype}")
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even number >= 2, got {blocksize}")
    scaled, absmax = blockwise_absmax(weight.detach().cpu(), blocksize)
    return pack_nibbles(nearest_code(scaled, nf4_code_book())), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to floats: ``code[index] * absmax[block]``, reshaped to ``shape`` (``n`` elements).

    ``packed`` is ``[ceil(n / 2), 1]`` uint8 and ``absmax`` ``[ceil(n / blocksize)]`` float32, as
    :func:`quantize_nf4` returns them (or as :func:`double_dequantize` restores the absmax).
    """
    n = math.prod(shape)
    if absmax.numel() != math.ceil(n / blocksize):
        raise ValueError(f"{absmax.numel()} absmax values do not fit {n} elements in blocks of "
                         f"{blocksize}")
    values = nf4_code_book()[unpack_nibbles(packed, n).long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------
# Double quantization of the scales
# --------------------------------------------------------------------------------------------

def dynamic_code_book() -> torch.Tensor:
    """The signed 8-bit "dynamic" code book ``[256]`` that bitsandbytes quantizes absmax with.

    Taken from bitsandbytes (``create_dynamic_map``): a sign, a run of zero bits standing for a
    decimal exponent 10^-k, and the remaining bits as a linear fraction, so it resolves small
    values finely and still reaches 1.
    """
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=True)


def double_quantize(absmax: torch.Tensor, blocksize: int = 256, table_size: int | None = None):
    """Quantize the fp32 absmax ``[m]`` of a 4-bit tensor to 8 bits, as ``compress_statistics``.

    Subtract the mean (``offset``, a scalar), then blockwise-absmax-quantize to the dynamic 8-bit
    code book in blocks of ``blocksize``. Returns ``(codes [m] uint8, absmax2 [ceil(m / blocksize)]
    float32, offset [] float32)``; bitsandbytes stores them as ``state.absmax``,
    ``state.state2.absmax`` and ``state.offset``. 4 bytes per 64 weights become about 1.

    ``table_size=None`` takes the exact nearest code. bitsandbytes' CPU kernel instead rounds each
    scaled value to one of ``65536`` evenly spaced points on [-1, 1] and looks up that point's
    nearest code; near zero, where the dynamic code book's steps (5.5e-7) are finer than the
    table's (3.1e-5), it then picks a neighbouring code. ``table_size=65536`` does the same and
    reproduces its codes bit for bit.
    """
    absmax = absmax.float().reshape(-1)
    offset = absmax.mean()
    scaled, absmax2 = blockwise_absmax(absmax - offset, blocksize)
    code = dynamic_code_book()
    if table_size is None:
        return nearest_code(scaled, code), absmax2, offset
    grid = -1.0 + (2.0 * torch.arange(table_size, dtype=torch.float32)) / (table_size - 1)
    slot = ((scaled + 1.0) * 0.5 * (table_size - 1) + 0.5).long()  # truncation, as C's cast
    return nearest_code(grid, code)[slot], absmax2, offset


def double_dequantize(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = 256) -> torch.Tensor:
    """The absmax ``[m]`` float32 back from :func:`double_quantize`'s three tensors."""
    values = dynamic_code_book()[codes.reshape(-1).long()]
    return values * absmax2.repeat_interleave(blocksize)[:values.numel()] + offset


# --------------------------------------------------------------------------------------------
# Storage cost
# --------------------------------------------------------------------------------------------

def bytes_per_parameter(fmt: str, blocksize: int = 64, blocksize2: int = 256) -> float:
    """Bytes per weight of a quantized layer, scales included (row scales of int8 excluded:
    4 bytes per row of thousands of weights).

    ``nf4``/``fp4``: half a byte plus one fp32 absmax per ``blocksize`` weights (0.5625 at 64);
    ``nf4+dq``/``fp4+dq``: the absmax in 8 bits plus one fp32 per ``blocksize2`` of those
    (0.5 + 1/64 + 4/16384 = 0.5159).
    """
    fixed = {"fp32": 4.0, "float32": 4.0, "none": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0}
    if fmt in fixed:
        return fixed[fmt]
    if fmt in ("nf4", "fp4"):
        return 0.5 + 4 / blocksize
    if fmt in ("nf4+dq", "fp4+dq"):
        return 0.5 + 1 / blocksize + 4 / (blocksize * blocksize2)
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}, fp4+dq")


def format_table(n_params: int, formats=FORMATS) -> list[dict]:
    """Rows ``{"format", "bytes/param", "GB"}`` for ``n_params`` weights stored in each format
    (GB = 1e9 bytes; every weight quantized, which real models do only for their linear layers)."""
    return [{"format": fmt, "bytes/param": bytes_per_parameter(fmt),
             "GB": n_params * bytes_per_parameter(fmt) / 1e9} for fmt in formats]

"""NF4 from first principles: a reference quantizer that reproduces bitsandbytes' CPU backend.

The lesson of notebook 01, written out in plain torch so that every step can be printed:

1. the NF4 code book, 16 values from quantiles of the standard normal (:func:`nf4_code_book`);
2. blockwise absmax scaling: each block of ``blocksize`` consecutive values (in row-major order)
   is divided by its largest magnitude, so it lies in ``[-1, 1]``;
3. each scaled value takes the index of the nearest code (:func:`nearest_code`);
4. two 4-bit indices share one byte, the first element in the high nibble (:func:`pack_nibbles`);
5. double quantization: the fp32 absmax values themselves are quantized to 8 bits, in blocks of
   256, after subtracting their mean (:func:`double_quantize`).

``quantize_nf4(w, 64)`` returns the same packed bytes and absmax as
``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`` on bitsandbytes' CPU
backend (bit for bit on the inputs tests/test_quantization.py tries; one known exception: in a
partial last block the CPU backend divides by the absmax instead of multiplying by its reciprocal,
and a value within one fp32 step of a threshold can then take the other code, as a hand-built
test shows). bitsandbytes' CUDA kernel decides
the codes with 15 hard-coded fp32 thresholds instead of midpoints computed in fp32, and 4 of those
15 lie one fp32 step away from the computed midpoints: a scaled value landing exactly on one of
the 4 fp32 numbers in between gets a neighbouring code there. ``quantize_nf4(w, 64,
arithmetic="cuda")`` emulates that kernel on the CPU (:func:`cuda_nf4_code`,
:func:`cuda_blockwise_scale`); notebook 01 (section 01.5) shows a value quantized both ways and
counts where the two differ on the GPU test's largest matrix, and tests/test_quantization.py pins
those counts. Training uses bitsandbytes itself; this module exists to be read.
"""
from __future__ import annotations

import math

import torch

#: The outermost quantile bitsandbytes' ``create_normal_map`` uses: the code book spans
#: ``norm.ppf(0.9677083)`` = 1.848 standard deviations, scaled to 1.
NF4_OFFSET = 0.9677083

#: The two ways :func:`quantize_nf4` can pick the codes: ``"nearest"`` (the midpoints of the code
#: book computed in fp32, as bitsandbytes' CPU backend) and ``"cuda"`` (bitsandbytes' CUDA kernel).
ARITHMETICS = ("nearest", "cuda")

#: The 15 decision thresholds of bitsandbytes' CUDA kernel, ascending, as written in its source
#: (csrc/kernels.cu, ``dQuantizeNF4``, bitsandbytes 0.50.x): each is the exact midpoint of two
#: neighbouring codes, computed in float64 and printed with 16-17 digits, then compiled as a
#: ``float`` literal (``...f``).
NF4_CUDA_THRESHOLD_LITERALS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476",
    "0.03979014977812767", "0.1202552504837513", "0.2035212516784668", "0.2920137718319893",
    "0.3893125355243683", "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)

#: The same thresholds as the fp32 bit patterns the compiler makes of those literals (nvcc 13.0
#: with bitsandbytes' ``--use_fast_math`` writes them into the PTX as ``setp.gt.ftz.f32 %f,
#: 0f3F5C89D9``). The decimal literal is rounded straight to the nearest fp32, not through a
#: float64, which matters here: the exact midpoint of codes 14 and 15 lies exactly halfway between
#: two fp32 numbers, the literal (0.8614784181118011) a hair below it, so the kernel's threshold
#: is the lower fp32 neighbour, while ``(code[14] + code[15]) / 2`` in fp32 rounds the tie to the
#: upper one (ties to even). The same happens at thresholds 0, 8 and 12.
NF4_CUDA_THRESHOLD_BITS = (
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
    0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF,
    0x3F5C89D9,
)

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
    midpoint takes the lower code, as bitsandbytes' ``torch.bucketize`` does. "Nearest" up to that
    fp32 rounding: for NF4, 7 of the 15 exact midpoints lie halfway between two fp32 numbers, and
    where the fp32 sum rounded up (midpoints 0, 1, 3, 4, 12 and 14) a value exactly on the rounded
    midpoint takes the lower code although the upper one is nearer.
    """
    return count_below(scaled, (code[:-1] + code[1:]) / 2)


def count_below(scaled: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For sorted ``thresholds`` ``[k]``: how many lie strictly below each value of ``scaled``
    (uint8, same shape as ``scaled``). A value equal to a threshold does not count it (the lower
    code wins the tie); NaN counts none (index 0)."""
    index = torch.zeros(scaled.shape, dtype=torch.uint8)
    for threshold in thresholds:  # 15 comparisons for NF4: light on memory for big matrices
        index += scaled > threshold
    return index


def nf4_cuda_thresholds() -> torch.Tensor:
    """bitsandbytes' CUDA NF4 thresholds ``[15]`` float32, ascending: ``threshold[i]`` separates
    code ``i`` from code ``i + 1`` (see :data:`NF4_CUDA_THRESHOLD_BITS`)."""
    bits = torch.tensor(NF4_CUDA_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32)
    return bits.view(torch.float32)


def cuda_nf4_code(scaled: torch.Tensor) -> torch.Tensor:
    """The code (uint8, same shape as ``scaled``) that bitsandbytes' CUDA kernel picks for fp32
    values already scaled by ``1 / absmax``.

    The kernel's ``dQuantizeNF4`` walks a binary tree of ``x > threshold`` tests, 4 deep; for
    sorted thresholds that is the number of thresholds strictly below ``x``: on a tie the lower
    code, and NaN (all tests false) gives code 0 (-1.0). Values are not clamped to [-1, 1]: outside
    they take code 0 or 15 anyway.
    """
    return count_below(scaled.float(), nf4_cuda_thresholds())


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a 1-D tensor ``[n]`` blockwise into ``[-1, 1]``.

    Returns ``(scaled [n] float32, absmax [ceil(n / blocksize)] float32)``; the last block may be
    shorter. Like bitsandbytes (its CUDA kernel, and its CPU backend except in a partial last
    block), it multiplies by ``1 / absmax`` (not divides by ``absmax``: the two can differ in the
    last bit, which can move a value across a threshold) and clamps to [-1, 1].
    """
    flat = flat.reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    return scaled.clamp(-1, 1).reshape(-1)[:n], absmax


def cuda_blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise scaling as bitsandbytes' CUDA kernel does it (``kQuantizeBlockwise`` and, for
    blocksize 64 and 32, ``kQuantizeBlockwiseSmall``, compiled with ``--use_fast_math``).

    ``flat`` ``[n]`` (any float dtype) is converted to fp32 exactly; fp32-subnormal values
    (``|x| < 2**-126``, which includes bf16 subnormals but no fp16 value) are flushed to zero, as
    the ``.ftz`` instructions do; ``absmax_b = max |x|`` over each block of ``blocksize`` values
    (the last block padded with zeros); then every value is multiplied by the fp32 reciprocal
    ``r_b = 1 / absmax_b``:

        scaled[j] = fp32(x[j] * fp32(1 / absmax_b)),   j in block b   (no clamp)

    Returns ``(scaled [ceil(n / blocksize) * blocksize] float32, absmax [ceil(n / blocksize)]
    float32)``: the padding is kept, since its code fills the last nibble when ``n`` is odd. An
    all-zero block has absmax 0, reciprocal +inf and ``0 * inf = NaN`` scaled values.

    One assumption: the kernel's ``1.0f / absmax`` compiles to ``rcp.approx.ftz.f32``, whose
    result PTX only promises within 1 ulp; here it is the correctly rounded reciprocal. See
    :func:`cuda_reciprocal_sensitive` for the codes that depend on it.
    """
    blocks, absmax = _cuda_blocks(flat, blocksize)
    reciprocal = 1.0 / absmax  # +inf for a zero block, as rcp.approx.ftz.f32(0)
    return (blocks * reciprocal.unsqueeze(1)).reshape(-1), absmax


def _cuda_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` -> (fp32 values with subnormals flushed, zero-padded ``[blocks, blocksize]``;
    their absmax ``[blocks]``)."""
    flat = flat.reshape(-1).float()
    flat = torch.where(flat.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(flat), flat)
    count = math.ceil(flat.numel() / blocksize)
    padded = torch.nn.functional.pad(flat, (0, count * blocksize - flat.numel()))
    padded = padded.view(count, blocksize)
    return padded, padded.abs().amax(dim=1)


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


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64,
                 arithmetic: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize a float tensor of any shape ``S`` (``n`` elements, row-major blocks).

    Returns ``(packed_codes [ceil(n / 2), 1] uint8, absmax [ceil(n / blocksize)] float32)``,
    comparable with ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    quant_type="nf4")``, whose ``(out, state)`` carries the same two tensors as ``out`` and
    ``state.absmax``. With ``a_b`` the absmax of block ``b`` and ``c`` the code book, element ``j``
    of block ``b`` gets the code

    - ``arithmetic="nearest"`` (bitsandbytes' CPU backend, which however divides by ``a_b`` in a
      partial last block): ``#{i : s_j > m_i}`` with
      ``s_j = clamp(fp32(x_j * fp32(1 / a_b)), -1, 1)`` and ``m_i = fp32((c_i + c_{i+1}) / 2)``;
    - ``arithmetic="cuda"`` (bitsandbytes' CUDA kernel): ``#{i : s_j > t_i}`` with ``s_j`` the
      same product unclamped (:func:`cuda_blockwise_scale`) and ``t_i`` the kernel's thresholds
      (:func:`nf4_cuda_thresholds`), which differ from ``m_i`` by one fp32 step for ``i`` in
      {0, 8, 12, 14}; a zero block gets code 0 (the kernel's NaN) instead of 7.

    The absmax is the same for both (except for fp32-subnormal inputs, flushed in ``"cuda"``).
    """
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a float tensor, got {weight.dtype}")
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even number >= 2, got {blocksize}")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    if arithmetic == "cuda":
        n = weight.numel()
        scaled, absmax = cuda_blockwise_scale(weight.detach().cpu(), blocksize)
        return pack_nibbles(cuda_nf4_code(scaled[:n + n % 2])), absmax
    scaled, absmax = blockwise_absmax(weight.detach().cpu(), blocksize)
    return pack_nibbles(nearest_code(scaled, nf4_code_book())), absmax


def cuda_codes_other_reciprocal(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """The ``arithmetic="cuda"`` codes (``[n]`` uint8, unpacked) had each block's ``1 / absmax``
    been the other fp32 neighbour of the exact reciprocal rather than the nearest one.

    The kernel computes the reciprocal with ``rcp.approx.ftz.f32`` (MUFU.RCP), documented only
    as within 1 ulp, so it may return either neighbour. The exact reciprocal is taken in float64,
    which decides the side for every fp32 absmax; where it is an fp32 number itself (absmax a
    power of two) it counts as exact, with no other neighbour.
    """
    blocks, absmax = _cuda_blocks(weight.detach().cpu(), blocksize)
    nearest = 1.0 / absmax
    exact = 1.0 / absmax.double()
    toward = torch.where(nearest.double() > exact, torch.zeros_like(nearest),
                         torch.full_like(nearest, math.inf))
    other = torch.where(nearest.double() == exact, nearest, torch.nextafter(nearest, toward))
    return cuda_nf4_code(blocks * other.unsqueeze(1)).reshape(-1)[:weight.numel()]


def cuda_reciprocal_sensitive(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Indices (int64 ``[k]``, into the flattened ``weight``) whose ``arithmetic="cuda"`` code
    would change if each block's ``1 / absmax`` were the other fp32 neighbour of the exact
    reciprocal (:func:`cuda_codes_other_reciprocal`): the codes for which the emulation's choice
    (the nearest) matters."""
    blocks, absmax = _cuda_blocks(weight.detach().cpu(), blocksize)
    nearest = cuda_nf4_code(blocks * (1.0 / absmax).unsqueeze(1)).reshape(-1)[:weight.numel()]
    return (nearest != cuda_codes_other_reciprocal(weight, blocksize)).nonzero().flatten()


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

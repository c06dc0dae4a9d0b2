"""The reference NF4 quantizer against bitsandbytes: code book, codes, scales, double quant;
and its emulation of bitsandbytes' CUDA kernel (``arithmetic="cuda"``), checked on the CPU against
exact rational arithmetic, hand-built values and the counts in notebook 01, section 01.5."""
import itertools
import struct
from fractions import Fraction

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from dpo_lib.lessons import quantization as Q  # noqa: E402


def test_code_book_equals_bitsandbytes():
    code = Q.nf4_code_book()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.equal(code, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert code[0] == -1 and code[7] == 0 and code[-1] == 1
    assert torch.all(code[1:] > code[:-1])


def test_pack_nibbles_worked_example():
    packed = Q.pack_nibbles(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
    assert packed.flatten().tolist() == [0x12, 0x34]
    assert Q.unpack_nibbles(packed, 4).tolist() == [1, 2, 3, 4]
    odd = Q.pack_nibbles(torch.tensor([15, 0, 9], dtype=torch.uint8))
    assert odd.flatten().tolist() == [0xF0, 0x97]  # padded with code 7 (zero)
    with pytest.raises(ValueError):
        Q.pack_nibbles(torch.tensor([16], dtype=torch.uint8))


@pytest.mark.parametrize("shape", [(4,), (7,), (3, 5), (257, 131), (512, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_nf4_bit_exact(shape, dtype, blocksize):
    torch.manual_seed(hash((shape, blocksize)) % 1000)
    weight = (torch.randn(shape) * 0.02).to(dtype)
    packed, absmax = Q.quantize_nf4(weight, blocksize=blocksize)
    expected, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
    assert packed.dtype == torch.uint8 and packed.shape == expected.shape
    assert torch.equal(packed, expected)
    assert torch.equal(absmax, state.absmax)
    restored = Q.dequantize_nf4(packed, absmax, shape, blocksize, dtype=dtype)
    assert torch.equal(restored, bnb_functional.dequantize_4bit(expected, state).reshape(shape))


def test_quantize_nf4_outliers_and_zero_block():
    weight = torch.randn(4, 64)
    weight[1] = 0.0
    weight[2, 5] = 100.0
    packed, absmax = Q.quantize_nf4(weight)
    expected, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, expected) and torch.equal(absmax, state.absmax)


def test_double_quantization_matches_compress_statistics():
    torch.manual_seed(0)
    weight = torch.randn(300, 999) * 0.05
    expected, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                                   compress_statistics=True)
    packed, absmax = Q.quantize_nf4(weight)
    codes, absmax2, offset = Q.double_quantize(absmax, table_size=65536)
    assert torch.equal(packed, expected)
    assert torch.equal(codes, state.absmax)
    assert torch.equal(absmax2, state.state2.absmax) and torch.equal(offset, state.offset)
    restored = Q.dequantize_nf4(packed, Q.double_dequantize(codes, absmax2, offset), weight.shape)
    assert torch.equal(restored, bnb_functional.dequantize_4bit(expected, state))
    # exact-nearest rounding differs from the CPU kernel's table only near zero, by a few steps
    nearest, _, _ = Q.double_quantize(absmax)
    differ = nearest != codes
    assert differ.float().mean() < 0.01
    err_nearest = (Q.double_dequantize(nearest, absmax2, offset) - absmax).abs()
    err_table = (Q.double_dequantize(codes, absmax2, offset) - absmax).abs()
    assert torch.all(err_nearest <= err_table + 1e-7)


def test_reference_matches_weights_quantized_by_transformers():
    """A tiny model loaded in NF4 by transformers holds exactly the codes of its fp32 weights."""
    from dpo_lib.core.config import load_config
    from dpo_lib.core.models import load_model

    cfg = load_config("tiny")
    full = load_model(cfg, quantization="none")
    quantized = load_model(cfg, quantization="nf4")  # fresh: no forward pass yet
    layer = quantized.gpt_neox.layers[0].mlp.dense_h_to_4h
    original = full.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.detach()
    packed, absmax = Q.quantize_nf4(original, blocksize=layer.weight.quant_state.blocksize)
    assert torch.equal(packed, layer.weight.data)
    assert torch.equal(absmax, layer.weight.quant_state.absmax)


def test_bytes_per_parameter_and_errors():
    assert Q.bytes_per_parameter("nf4") == 0.5625
    assert Q.bytes_per_parameter("nf4+dq") == pytest.approx(0.5 + 1 / 64 + 4 / 16384)
    assert Q.bytes_per_parameter("bf16") == 2 and Q.bytes_per_parameter("int8") == 1
    rows = Q.format_table(2_000_000_000)
    assert [r["format"] for r in rows] == list(Q.FORMATS)
    assert rows[0]["GB"] == 8.0
    with pytest.raises(ValueError, match="unknown format"):
        Q.bytes_per_parameter("nf3")
    with pytest.raises(TypeError):
        Q.quantize_nf4(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_nf4(torch.ones(4), blocksize=3)
    with pytest.raises(ValueError, match="arithmetic"):
        Q.quantize_nf4(torch.ones(4), arithmetic="fast")
    with pytest.raises(ValueError, match="absmax"):
        Q.dequantize_nf4(torch.zeros(2, 1, dtype=torch.uint8), torch.ones(3), (4,))


# --------------------------------------------------------------------------------------------
# The CUDA kernel's arithmetic, emulated (notebook 01, section 01.5)
# --------------------------------------------------------------------------------------------

def f32(bits: int) -> float:
    return struct.unpack(">f", bits.to_bytes(4, "big"))[0]


def bits32(value: float) -> int:
    return struct.unpack(">I", struct.pack(">f", value))[0]


def nearest_fp32(value: Fraction) -> float:
    """The fp32 nearest to an exact rational (not through float64), asserting it is no tie."""
    guess = bits32(float(value))
    candidates = [f32(b) for b in (guess - 1, guess, guess + 1)]
    distances = sorted((abs(Fraction(c) - value), c) for c in candidates)
    assert distances[0][0] != distances[1][0]
    return distances[0][1]


def ulp32(value: float) -> Fraction:
    return abs(Fraction(f32(bits32(value) + 1)) - Fraction(value))


def test_cuda_thresholds_are_the_code_book_midpoints_to_fp32_precision():
    thresholds = Q.nf4_cuda_thresholds()
    assert thresholds.shape == (15,) and thresholds.dtype == torch.float32
    assert torch.all(thresholds[1:] > thresholds[:-1])
    code = [Fraction(c) for c in Q.nf4_code_book().tolist()]
    exact = [(lo + hi) / 2 for lo, hi in itertools.pairwise(code)]
    computed = ((Q.nf4_code_book()[:-1] + Q.nf4_code_book()[1:]) / 2).tolist()
    differ = []
    for i, (literal, t) in enumerate(zip(Q.NF4_CUDA_THRESHOLD_LITERALS, thresholds.tolist())):
        # the source's literal is the float64 midpoint, and the bit table is that literal rounded
        # straight to fp32, as a C compiler reads "...f"
        assert Fraction(float(literal)) == exact[i]
        assert t == nearest_fp32(Fraction(literal))
        assert abs(Fraction(t) - exact[i]) <= ulp32(t) / 2       # a nearest fp32 of the midpoint
        if t != computed[i]:
            differ.append(i)
            assert abs(bits32(t) - bits32(computed[i])) == 1
            # the exact midpoint is a tie between the two fp32 numbers: each side is "nearest"
            assert (Fraction(t) + Fraction(computed[i])) / 2 == exact[i]
    assert differ == [0, 8, 12, 14]
    # 7 exact midpoints are fp32 ties; the fp32 sum rounds 6 of them up, where a value exactly on
    # the computed midpoint takes the lower code though the upper one is nearer
    ties = []
    for i, (e, m) in enumerate(zip(exact, computed)):
        others = [f32(bits32(m) + step) for step in (-1, 1)]
        if Fraction(m) != e and any((Fraction(m) + Fraction(o)) / 2 == e for o in others):
            ties.append(i)
    assert ties == [0, 1, 3, 4, 8, 12, 14]
    assert [i for i in ties if Fraction(computed[i]) > exact[i]] == [0, 1, 3, 4, 12, 14]


#: The four fp32 numbers that the two arithmetics code differently (the upper of each threshold
#: pair): (bits, nearest-code reference, CUDA kernel, exactly nearest code).
DISAGREEMENTS = [(0xBF591CD8, 0, 1, 1), (0x3DF64863, 9, 8, 9), (0x3F006D04, 12, 13, 13),
                 (0x3F5C89DA, 14, 15, 15)]


def codes_of(values: list[float], arithmetic: str) -> list[int]:
    """The codes of ``values`` in one block whose absmax is exactly 1 (so 1 / absmax = 1)."""
    block = torch.tensor([1.0] + values, dtype=torch.float32)
    block = torch.nn.functional.pad(block, (0, -block.numel() % 64))
    packed, absmax = Q.quantize_nf4(block, blocksize=64, arithmetic=arithmetic)
    assert absmax.tolist() == [1.0] * (block.numel() // 64)
    return Q.unpack_nibbles(packed, block.numel())[1:1 + len(values)].tolist()


def test_cuda_codes_just_above_below_and_on_each_threshold():
    thresholds = Q.nf4_cuda_thresholds()
    midpoints = (Q.nf4_code_book()[:-1] + Q.nf4_code_book()[1:]) / 2
    for i in range(15):
        t, m = thresholds[i:i + 1], midpoints[i:i + 1]
        below = torch.nextafter(t, torch.tensor([-2.0])).item()
        above = torch.nextafter(t, torch.tensor([2.0])).item()
        assert codes_of([below, t.item(), above], "cuda") == [i, i, i + 1]    # a tie: lower code
        below = torch.nextafter(m, torch.tensor([-2.0])).item()
        above = torch.nextafter(m, torch.tensor([2.0])).item()
        assert codes_of([below, m.item(), above], "nearest") == [i, i, i + 1]
    values = [f32(bits) for bits, *_ in DISAGREEMENTS]
    assert codes_of(values, "nearest") == [d[1] for d in DISAGREEMENTS]
    assert codes_of(values, "cuda") == [d[2] for d in DISAGREEMENTS]
    code = [Fraction(c) for c in Q.nf4_code_book().tolist()]
    for value, (*_, nearest) in zip(values, DISAGREEMENTS):   # exact distances, no rounding
        assert nearest == min(range(16), key=lambda k: abs(Fraction(value) - code[k]))


def test_cuda_emulation_multiplies_by_the_reciprocal():
    # x / a lands exactly on threshold 9 (a tie: code 9); x * fp32(1 / a) one step above (code 10)
    a, x = f32(0x3D1A49D2), f32(0x3BFB352B)
    assert Q.cuda_nf4_code(torch.tensor([x]) / a).item() == 9
    assert Q.cuda_nf4_code(torch.tensor([x]) * (1.0 / torch.tensor(a))).item() == 10
    for arithmetic in Q.ARITHMETICS:
        packed, _ = Q.quantize_nf4(torch.tensor([a, x]), blocksize=2, arithmetic=arithmetic)
        assert Q.unpack_nibbles(packed, 2).tolist() == [15, 10]


def test_cpu_backend_divides_in_a_partial_last_block():
    """A known limit of "bit for bit": bitsandbytes' CPU backend (backends/default/ops.py) scales
    whole blocks by ``x * (1 / absmax)`` but a partial last block by ``x / absmax``; the reference
    multiplies everywhere. The hand-built pair above then differs in a partial block only."""
    a, x = f32(0x3D1A49D2), f32(0x3BFB352B)
    whole = torch.cat([torch.tensor([a, x]), torch.zeros(62), torch.tensor([a, x])])
    packed, absmax = Q.quantize_nf4(whole)
    expected, state = bnb_functional.quantize_4bit(whole, blocksize=64, quant_type="nf4")
    assert torch.equal(absmax, state.absmax)
    assert Q.unpack_nibbles(packed, 66)[[0, 1, 64, 65]].tolist() == [15, 10, 15, 10]
    assert Q.unpack_nibbles(expected, 66)[[0, 1, 64, 65]].tolist() == [15, 10, 15, 9]


def test_cuda_emulation_zero_and_subnormal_blocks():
    torch.manual_seed(3)
    weight = torch.randn(3, 64)
    weight[0] = 0.0
    weight[1] = torch.tensor([1e-39, -3e-40] * 32)            # fp32 subnormals: flushed to zero
    packed, absmax = Q.quantize_nf4(weight, arithmetic="cuda")
    nearest, nearest_absmax = Q.quantize_nf4(weight)
    codes, reference = Q.unpack_nibbles(packed, 192), Q.unpack_nibbles(nearest, 192)
    assert absmax[:2].tolist() == [0.0, 0.0] and nearest_absmax[1] > 0
    assert torch.equal(absmax[2], nearest_absmax[2])
    assert codes[:128].eq(0).all()          # 0 * (1 / 0) = NaN: every test false, code 0 (-1.0)
    assert reference[:64].eq(7).all()       # the reference keeps zeros at code 7 (0.0)
    assert torch.equal(codes[128:], reference[128:])
    assert Q.dequantize_nf4(packed, absmax, (3, 64))[:2].eq(0).all()
    # an odd count: the kernel's padding value 0 takes the code of its block, NaN in a zero block
    assert Q.quantize_nf4(torch.zeros(7), arithmetic="cuda")[0].flatten().tolist() == [0] * 4
    assert Q.quantize_nf4(torch.zeros(7))[0].flatten().tolist() == [0x77] * 4
    odd = torch.tensor([0.5, -1.0, 0.25])
    assert Q.quantize_nf4(odd, arithmetic="cuda")[0].flatten().tolist() == [0xC0, 0xA7]  # 12 0 10


#: The inputs of tests/test_gpu.py::test_cuda_nf4_codes_equal_the_cuda_emulation; for each, the
#: flat indices where the emulated CUDA codes differ from the nearest-code reference, and those
#: whose emulated code depends on how the kernel's rcp.approx rounds 1 / absmax (notebook 01, section 01.5).
GPU_CASES = [(shape, dtype) for shape in [(7,), (257, 131), (2560, 2560)]
             for dtype in (torch.float32, torch.bfloat16, torch.float16)]
CUDA_VS_NEAREST = {((2560, 2560), torch.float32): [6457096]}
RECIPROCAL_SENSITIVE = {((2560, 2560), torch.float32): [136409, 483471]}


@pytest.mark.parametrize("shape,dtype", GPU_CASES)
def test_cuda_emulation_differs_from_nearest_exactly_where_counted(shape, dtype):
    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * 0.02).to(dtype)
    n = weight.numel()
    packed, absmax = Q.quantize_nf4(weight, blocksize=64, arithmetic="cuda")
    nearest, nearest_absmax = Q.quantize_nf4(weight, blocksize=64)
    assert packed.shape == nearest.shape and torch.equal(absmax, nearest_absmax)
    codes, reference = Q.unpack_nibbles(packed, n), Q.unpack_nibbles(nearest, n)
    differ = (codes != reference).nonzero().flatten().tolist()
    assert differ == CUDA_VS_NEAREST.get((shape, dtype), [])
    scaled, _ = Q.cuda_blockwise_scale(weight, 64)
    for i in differ:                      # each one the fp32 value just above threshold 14
        assert bits32(scaled[i].item()) == 0x3F5C89DA
        assert (reference[i].item(), codes[i].item()) == (14, 15)
    sensitive = Q.cuda_reciprocal_sensitive(weight, 64).tolist()
    assert sensitive == RECIPROCAL_SENSITIVE.get((shape, dtype), [])
    assert not set(sensitive) & set(differ)

"""The reference NF4 quantizer against bitsandbytes: code book, codes, scales, double quant."""
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
    with pytest.raises(ValueError, match="absmax"):
        Q.dequantize_nf4(torch.zeros(2, 1, dtype=torch.uint8), torch.ones(3), (4,))

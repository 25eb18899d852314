import torch

from gptoss import mxfp4


def test_every_code_in_both_nibbles():
    codes = torch.arange(16, dtype=torch.uint8)
    # byte b holds element 2b in its low nibble and 2b+1 in its high nibble
    blocks = (codes | (codes.flip(0) << 4)).view(1, 16)  # (G=1, 16)
    scales = torch.tensor([127], dtype=torch.uint8)  # 2**0
    values = mxfp4.dequantize(blocks, scales, torch.float32)
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    expected = []
    for c in range(16):
        expected += [table[c], table[15 - c]]
    assert values.tolist() == expected


def test_negative_zero_keeps_its_sign():
    blocks = torch.full((1, 16), 0x88, dtype=torch.uint8)
    values = mxfp4.dequantize(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)
    assert torch.all(values == 0) and torch.all(torch.signbit(values))


def test_scale_bias_and_extremes():
    blocks = torch.full((4, 16), 0x71, dtype=torch.uint8)  # low nibble 0.5, high nibble 6
    scales = torch.tensor([127, 130, 120, 1], dtype=torch.uint8)
    values = mxfp4.dequantize(blocks, scales, torch.float32).view(4, 32)
    for row, s in enumerate([127, 130, 120, 1]):
        assert values[row, 0].item() == 0.5 * 2.0 ** (s - 127)
        assert values[row, 1].item() == 6.0 * 2.0 ** (s - 127)


def test_blocks_of_32_along_the_last_axis_and_bf16_exact():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 140, (3, 5, 4), dtype=torch.uint8, generator=gen)
    values = mxfp4.dequantize(blocks, scales, torch.float32)
    assert values.shape == (3, 5, 128)
    b, r, g, j = 2, 3, 1, 7
    byte = int(blocks[b, r, g, j])
    expected = mxfp4.FP4_VALUES[byte >> 4] * 2.0 ** (int(scales[b, r, g]) - 127)
    assert values[b, r, g * 32 + 2 * j + 1].item() == expected
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.bfloat16).float(), values)


def test_pair_collector_pairs_either_order():
    pairs = mxfp4.PairCollector()
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 3, 1, 16), dtype=torch.uint8, generator=gen)  # (E, rows, G, 16)
    scales = torch.randint(120, 130, (2, 3, 1), dtype=torch.uint8, generator=gen)
    assert pairs.add("block.0.mlp.mlp1_weight.scales", scales) is None
    assert pairs.add("block.1.mlp.mlp1_weight.blocks", blocks) is None
    weight, got_blocks, got_scales = pairs.add("block.0.mlp.mlp1_weight.blocks", blocks)
    assert weight == "block.0.mlp.mlp1_weight" and got_blocks is blocks and got_scales is scales
    out = mxfp4.dequantize_into(torch.full((2, 3, 32), float("nan")), blocks, scales)
    assert torch.equal(out, mxfp4.dequantize(blocks, scales, torch.float32))

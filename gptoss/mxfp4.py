"""MXFP4 (OCP microscaling FP4) weights as gpt-oss ships its experts.

Blocks of 32 consecutive values along the input axis share one E8M0 scale byte; each data byte holds two E2M1
codes, element 2b in the low nibble and 2b+1 in the high nibble. value = FP4_VALUES[code] * 2**(scale - 127).
Layouts: blocks [..., G, 16] uint8 and scales [..., G] uint8 dequantize to [..., G * 32].
"""

import torch

BLOCK_SIZE = 32
SCALE_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_lut_cache: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    if device not in _lut_cache:
        _lut_cache[device] = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return _lut_cache[device]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> values [..., G * 32] in `dtype` (exact for bf16)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"MXFP4 shapes disagree: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    lut = _lut(blocks.device)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # (..., G, 32): low nibble first
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1))
    return values.flatten(-2).to(dtype)  # (..., G * 32)



def dequantize_into(out: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantizes experts (E, rows, G, 16) / (E, rows, G) into out (E, rows, G * 32), one expert at a time so the
    float32 temporaries stay one expert's size."""
    for e in range(out.shape[0]):
        out[e].copy_(dequantize(blocks[e], scales[e], out.dtype))
    return out


class PairCollector:
    """Pairs the `<weight>.blocks` and `<weight>.scales` tensors of MXFP4 weights as they stream past, in either
    order (checkpoint files list tensors in any order)."""

    def __init__(self):
        self._waiting: dict[str, tuple[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """-> (weight name without the suffix, blocks, scales) once both halves are in; None until then."""
        prefix, part = name.rsplit(".", 1)
        if prefix not in self._waiting:
            self._waiting[prefix] = (part, tensor)
            return None
        _, other = self._waiting.pop(prefix)
        return (prefix, tensor, other) if part == "blocks" else (prefix, other, tensor)

"""Storage for the experts' weights: packed MXFP4 (as released) or dense (dequantized / fine-tuned checkpoints).

Both give `expert(e, dtype)` -> one expert's (out_features, in_features) matrix, so the MoE code is the same.
"""

import torch
from torch import nn

from gptoss import mxfp4


class MXFP4Experts(nn.Module):
    """Packed weights, kept packed in memory: blocks (E, out, in/32, 16) uint8 and scales (E, out, in/32) uint8."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, device=None):
        super().__init__()
        groups = in_features // mxfp4.BLOCK_SIZE
        self.register_buffer(
            "blocks", torch.zeros(num_experts, out_features, groups, mxfp4.BLOCK_SIZE // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(num_experts, out_features, groups, dtype=torch.uint8, device=device))

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        return mxfp4.dequantize(self.blocks[e], self.scales[e], dtype)


class DenseExperts(nn.Module):
    """Dense weights (E, out, in), trainable."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, out_features, in_features, device=device, dtype=dtype))

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[e].to(dtype)

"""Light modules inside a frozen open_clip image tower (LIFT's parameter-efficient fine-tuning).

Shi et al., "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts", ICML 2024
(arXiv 2309.10019). Written from the paper and the facts of its code (`shijxcs/LIFT`):

- adaptformer: a bottleneck LN -> down -> ReLU -> up, times a learned scale (starts at 1), added
  beside each block's MLP, fed the MLP sub-layer's input (Chen et al., NeurIPS 2022); ViT only.
- lora: low-rank updates of each block's query and value projections, scaled by 1/rank
  (Hu et al., ICLR 2022); ViT only.
- bitfit: every bias term of the tower trains, nothing is added (Ben Zaken et al., ACL 2022); ViT
  and ResNet (LIFT's bias tuning covers the ViT blocks' biases only; here also the stem's, the final
  norm's and, on a ResNet, the batch norms' and the attention pool's, a ResNet's only biases).
- auto: LIFT's default where it applies, AdaptFormer on a ViT; BitFit on a ResNet.

Every added up-projection starts at zero, so before the first step the tower computes exactly
what the frozen one does. The bottleneck width, unless set, is LIFT's rule: the power of two at
or below K / (2 x blocks), at least 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ecvl_fast import EcvlError
from ecvl_fast.config import CHOICES

MODULES = CHOICES["stage2", "peft"]


def bottleneck(num_classes: int, blocks: int, module: str = "adaptformer") -> int:
    """The default width, as LIFT's and LIFT+'s code set it (trainer.py, `build_tuner`): AdaptFormer's
    bottleneck 2 ** floor(log2(K / (2 L))), LoRA's rank 2 ** floor(log2(K / (4 L))), at least 1
    (32 and 16 for ImageNet-LT on ViT-B's 12 blocks)."""
    per_block = 4 if module == "lora" else 2
    return 2 ** max(0, int(math.log2(max(1.0, num_classes / (per_block * blocks)))))


def saved_width(state: dict) -> int:
    """The LoRA rank a saved tower was trained with (its `.a` tensors are [2, D, rank]), 0 if it has
    no LoRA: a checkpoint or export from before LoRA's K / (4 L) rule loads at its own rank."""
    for key, value in state.items():
        if key.endswith("attn.a") and getattr(value, "ndim", 0) == 3:
            return int(value.shape[-1])
    return 0


class Bottleneck(nn.Module):
    """AdaptFormer's branch: scale * up(ReLU(down(LN(x)))), up zero-initialised."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down, self.up = nn.Linear(dim, width), nn.Linear(width, dim)
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias), nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(F.relu(self.down(self.ln(x))))


class AdaptFormerBlock(nn.Module):
    """An open_clip ResidualAttentionBlock with the bottleneck beside its MLP: the block's own
    two residual steps, then the branch on the MLP sub-layer's input."""

    def __init__(self, block: nn.Module, width: int):
        super().__init__()
        self.block, self.branch = block, Bottleneck(block.ln_2.normalized_shape[0], width)

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer asks its first block
        return self.block.get_weight_dtype()

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        b = self.block
        x = q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), attn_mask=attn_mask))
        return x + b.ls_2(b.mlp(b.ln_2(x))) + self.branch(x)


class LoRAAttention(nn.Module):
    """nn.MultiheadAttention with W_q and W_v each plus (A B)^T / rank; B starts at zero."""

    def __init__(self, attn: nn.MultiheadAttention, rank: int):
        super().__init__()
        d = attn.embed_dim
        self.attn, self.rank = attn, rank
        self.a = nn.Parameter(torch.empty(2, d, rank))  # [q, v]
        self.b = nn.Parameter(torch.zeros(2, rank, d))
        for a in self.a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, query, key, value, need_weights=False, attn_mask=None):
        m = self.attn
        delta = (self.a @ self.b).transpose(1, 2) / self.rank  # [2, D, D] as (out, in) weights
        weight = m.in_proj_weight + torch.cat([delta[0], torch.zeros_like(delta[0]), delta[1]])
        q, k, v = (t.transpose(0, 1) for t in (query, key, value)) if m.batch_first else (query, key, value)
        out, _ = F.multi_head_attention_forward(
            q,
            k,
            v,
            m.embed_dim,
            m.num_heads,
            weight,
            m.in_proj_bias,
            m.bias_k,
            m.bias_v,
            m.add_zero_attn,
            m.dropout,
            m.out_proj.weight,
            m.out_proj.bias,
            training=self.training,
            need_weights=False,
            attn_mask=attn_mask,
        )
        return (out.transpose(0, 1) if m.batch_first else out), None


def _is_vit(visual: nn.Module) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return blocks is not None and all(isinstance(b, ResidualAttentionBlock) for b in blocks)


def _vit_blocks(visual: nn.Module, module: str, tower: str) -> nn.ModuleList:
    if not _is_vit(visual):
        raise EcvlError(
            f"stage2.peft = {module!r} adds to a ViT's attention blocks, and {tower}'s image tower is "
            f'{type(visual).__name__}, not an open_clip ViT: use "bitfit" (or "none")'
        )
    return visual.transformer.resblocks


def apply(visual: nn.Module, module: str, num_classes: int, width: int = 0, tower: str = "this model") -> str:
    """Freeze `visual`, then add `module` to it in place (the added parameters train); returns
    the module added ("auto" resolved). `width` 0: LIFT's rule for the module (`bottleneck`)."""
    visual.requires_grad_(False)
    if module == "auto":
        module = "adaptformer" if _is_vit(visual) else "bitfit"
    if module == "bitfit":
        for name, p in visual.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif module in ("adaptformer", "lora"):
        blocks = _vit_blocks(visual, module, tower)
        width = width or bottleneck(num_classes, len(blocks), module)
        for i, block in enumerate(blocks):
            if module == "adaptformer":
                blocks[i] = AdaptFormerBlock(block, width)
            else:
                block.attn = LoRAAttention(block.attn, width)
    elif module != "none":
        raise EcvlError(f"stage2.peft = {module!r}: choose one of {', '.join(MODULES)}")
    return module

"""Swin-Tiny from timm, cut into blocks whose attention and MLP residues both count.

The timm model is built once (``pretrained=False``); its patch embedding is the stem,
every ``SwinTransformerBlock`` becomes a :class:`SwinBlock` and every patch-merging
layer a plain :class:`PatchMergingBlock`. timm's final norm and classifier are dropped:
the auxiliary heads replace them. Features are channels-last (B, H, W, C).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from trgl_dist.network.models.blocks import Block

if TYPE_CHECKING:
    from trgl_dist.network.models import InputSpec

SWIN_TINY = "swin_tiny_patch4_window7_224"
SWIN_DEFAULT_WIDTH = 96
SWIN_PATCH = 4
SWIN_MAX_WINDOW = 7
#: Heads of Swin-Tiny's first stage: the embedding width must divide among them.
SWIN_FIRST_STAGE_HEADS = 3


class SwinBlock(Block):
    """One timm ``SwinTransformerBlock``, re-run through its own submodules.

    ``x + r_attn`` then ``+ r_mlp``, where each residue is the branch exactly as added
    (after drop-path). The shifted-window attention is timm's ``_attn`` (partition,
    mask, attention, reverse), so the numbers are timm's own.
    """

    def __init__(self, timm_block: nn.Module) -> None:
        super().__init__()
        self.block = timm_block

    def forward(self, x_BHWC: Tensor) -> tuple[Tensor, list[Tensor]]:
        block: Any = self.block  # timm's SwinTransformerBlock (untyped submodules)
        r_attn = block.drop_path1(block._attn(block.norm1(x_BHWC)))
        x_BHWC = x_BHWC + r_attn
        # timm flattens H, W for the MLP; LayerNorm and Linear act on the last dim only.
        r_mlp = block.drop_path2(block.mlp(block.norm2(x_BHWC)))
        return x_BHWC + r_mlp, [r_attn, r_mlp]


class PatchMergingBlock(Block):
    """timm's patch merging (2x2 neighbours -> LayerNorm -> Linear): a plain block."""

    has_residue = False

    def __init__(self, merging: nn.Module) -> None:
        super().__init__()
        self.merging = merging

    def forward(self, x_BHWC: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.merging(x_BHWC), []


def window_for(size: int) -> int:
    """The largest window <= 7 that divides the first stage's patch grid.

    224 px -> grid 56, window 7 (the original); 96 -> 24, 6; 64 -> 16, 4; 32 -> 8, 4;
    28 -> 7, 7. timm clamps the window to deeper, smaller grids and pads when needed.
    """
    grid = max(size // SWIN_PATCH, 1)
    return max(w for w in range(1, SWIN_MAX_WINDOW + 1) if grid % w == 0)


def create_timm_swin(spec: InputSpec, width: int) -> Any:
    """timm's Swin-Tiny at this input size, channel count, class count and width."""
    try:
        import timm
    except ImportError as error:
        raise ValueError("swin-tiny needs timm: pip install timm") from error
    if width % SWIN_FIRST_STAGE_HEADS or width <= 0:
        raise ValueError(f"swin-tiny width must be a positive multiple of 3, got {width}")
    return timm.create_model(
        SWIN_TINY,
        pretrained=False,
        img_size=spec.size,
        in_chans=spec.channels,
        num_classes=spec.num_classes,
        embed_dim=width,
        window_size=window_for(spec.size),
    )


def swin_tiny(spec: InputSpec, width: int = 0) -> tuple[nn.Module, list[Block]]:
    """Stem = patch embedding; blocks = [merge] + transformer blocks, stage by stage.

    Swin-Tiny has depths (2, 2, 6, 2): 12 transformer blocks and 3 merges, 15 in all.
    """
    model = create_timm_swin(spec, width or SWIN_DEFAULT_WIDTH)
    blocks: list[Block] = []
    for stage in model.layers:
        if not isinstance(stage.downsample, nn.Identity):
            blocks.append(PatchMergingBlock(stage.downsample))
        blocks.extend(SwinBlock(timm_block) for timm_block in stage.blocks)
    stem: nn.Module = model.patch_embed
    return stem, blocks

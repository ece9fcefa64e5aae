"""SABW: the Spatial-Aware Block-Wise aggregator of AFA (paper section 3.3).

One `SABWBlock` per aggregation point. It reads the N experts' features at that point,
the (mean) time embedding and the (mean) text context, and returns softmax weights
over the experts at every pixel. `Aggregator` holds one block per point.

Parameter and key names follow the research code (diffusers' ResnetBlock2D and
Transformer2DModel), so its saved weights load without renaming.
`operations` is any namespace with Linear, Conv2d, GroupNorm and LayerNorm classes
(torch.nn by default; ComfyUI passes comfy.ops so its memory manager can stream them).
"""
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .spec import FullRes

TORCH_OPERATIONS = SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm,
                                   LayerNorm=nn.LayerNorm)


@dataclass(frozen=True)
class SABWConfig:
    num_models: int
    hidden: int = 128            # d
    heads: int = 8               # head dim = hidden / heads
    depth: int = 2               # transformer blocks per point (the paper's counts need 2)
    context_dim: int = 768       # text encoder width (SD1.5 768, SDXL 2048)
    time_embed_dim: int = 1280   # UNet time-embedding width

    def __post_init__(self):
        if not 2 <= self.num_models <= 16:
            raise ValueError(f"SABW needs 2 to 16 models, got {self.num_models}")
        if self.hidden % self.heads or self.hidden % 32:
            raise ValueError(f"hidden={self.hidden} must divide by heads={self.heads} and by 32 (GroupNorm)")

    def to_dict(self):
        return asdict(self)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, + Linear(SiLU(temb)), GroupNorm-SiLU-conv3x3, residual."""

    def __init__(self, d, temb_dim, ops):
        super().__init__()
        self.norm1 = ops.GroupNorm(32, d, eps=1e-6)
        self.conv1 = ops.Conv2d(d, d, 3, padding=1)
        self.time_emb_proj = ops.Linear(temb_dim, d)
        self.norm2 = ops.GroupNorm(32, d, eps=1e-6)
        self.conv2 = ops.Conv2d(d, d, 3, padding=1)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Attention(nn.Module):
    def __init__(self, d, heads, context_dim, ops):
        super().__init__()
        self.heads = heads
        self.to_q = ops.Linear(d, d, bias=False)
        self.to_k = ops.Linear(context_dim, d, bias=False)
        self.to_v = ops.Linear(context_dim, d, bias=False)
        self.to_out = nn.ModuleList([ops.Linear(d, d)])

    def forward(self, x, context):
        # x: (batch, tokens, d); context: (batch, context_tokens, context_dim)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, d, inner, ops):
        super().__init__()
        self.proj = ops.Linear(d, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


# On the CPU the feed-forward runs on pieces of this many (batch x token) rows: its 8d-wide
# intermediates then stay ~1 MB, which the allocator re-uses, instead of fresh multi-MB buffers
# paid in page faults (7-11% of a full-resolution SABW block, measured; rows are independent,
# so the result is the same).
FEED_FORWARD_ROWS = 256


class FeedForward(nn.Module):
    def __init__(self, d, ops):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(d, 4 * d, ops), nn.Identity(), ops.Linear(4 * d, d)])

    def forward(self, x):
        # x: (batch, tokens, d)
        batch, tokens = x.shape[:2]
        if x.device.type != "cpu" or batch * tokens <= FEED_FORWARD_ROWS:
            return self._rows(x)
        return torch.cat([self._rows(part) for part in x.split(max(1, FEED_FORWARD_ROWS // batch), dim=1)], dim=1)

    def _rows(self, x):
        for layer in self.net:
            x = layer(x)
        return x


def pooled_tokens(tokens, grid):
    """(batch, h*w, d) tokens of an h x w grid -> (batch, ceil(h/2)*ceil(w/2), d), 2x2 averages
    (an odd last row/column is averaged over the positions it has)."""
    height, width = grid
    picture = tokens.transpose(1, 2).unflatten(2, (height, width))  # (batch, d, h, w), a view
    return F.avg_pool2d(picture, 2, ceil_mode=True).flatten(2).transpose(1, 2)


class TransformerBlock(nn.Module):
    def __init__(self, d, heads, context_dim, ops):
        super().__init__()
        self.norm1 = ops.LayerNorm(d)
        self.attn1 = Attention(d, heads, d, ops)
        self.norm2 = ops.LayerNorm(d)
        self.attn2 = Attention(d, heads, context_dim, ops)
        self.norm3 = ops.LayerNorm(d)
        self.ff = FeedForward(d, ops)

    def forward(self, x, context, pool_grid=None):
        """pool_grid (h, w): self-attention reads keys/values of the 2x2-averaged grid (to_k and
        to_v are linear, so this is attention over pooled keys and values, same weights)."""
        h = self.norm1(x)
        x = x + self.attn1(h, h if pool_grid is None else pooled_tokens(h, pool_grid))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer(nn.Module):
    """GroupNorm, 1x1 proj_in, `depth` transformer blocks, 1x1 proj_out, residual."""

    def __init__(self, d, heads, depth, context_dim, ops):
        super().__init__()
        self.norm = ops.GroupNorm(32, d, eps=1e-6)
        self.proj_in = ops.Conv2d(d, d, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(d, heads, context_dim, ops) for _ in range(depth)])
        self.proj_out = ops.Conv2d(d, d, 1)

    def forward(self, x, context, pool_kv=False):
        _, _, height, width = x.shape
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context, (height, width) if pool_kv else None)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class SABWBlock(nn.Module):
    """Aggregator for one point with `channels` feature channels per model."""

    def __init__(self, channels: int, config: SABWConfig, ops=TORCH_OPERATIONS):
        super().__init__()
        n, d = config.num_models, config.hidden
        self.num_models = n
        self.conv_in = ops.Conv2d(n * channels, d, 1)
        self.res_block = ResnetBlock(d, config.time_embed_dim, ops)
        self.transformer = Transformer(d, config.heads, config.depth, config.context_dim, ops)
        self.conv_out = ops.Conv2d(d, n, 1, bias=False)

    def forward(self, features, temb, context, full_res=FullRes.EXACT):
        """features: the N models' (batch, channels, h, w) maps, or them stacked (batch, models,
        channels, h, w) -> weights (batch, models, h, w), softmax over models (in fp32).
        `full_res` (for the points at the latent's full resolution): EXACT; POOLED self-attends
        over 2x2-averaged keys/values; HALF runs the block on 2x2-averaged features and
        upsamples its logits (bilinear) before the softmax. Same weights in every case."""
        if torch.is_tensor(features):
            x = features.flatten(1, 2)               # (batch, models * channels, h, w), a view
        else:
            x = torch.cat(list(features), dim=1)     # the same, from the N maps
        size, dtype = x.shape[-2:], x.dtype
        if full_res is FullRes.HALF:
            x = F.avg_pool2d(x, 2, ceil_mode=True)  # commutes with the 1x1 conv_in
        x = self.res_block(self.conv_in(x), temb)
        logits = self.conv_out(self.transformer(x, context, pool_kv=full_res is FullRes.POOLED))
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return torch.softmax(logits.float(), dim=1).to(dtype)


class Aggregator(nn.Module):
    """One SABWBlock per aggregation point, in execution order.

    `point_channels[j]` is the feature width at point j (see layout.AggregationPoint).
    """

    def __init__(self, point_channels, config: SABWConfig, ops=TORCH_OPERATIONS):
        super().__init__()
        self.config = config
        self.point_channels = list(point_channels)
        self.blocks = nn.ModuleList([SABWBlock(c, config, ops) for c in self.point_channels])
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0):
        """Explicit init (comfy.ops layers skip it). conv_out is ZERO: a fresh aggregator gives 1/N."""
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("conv_out.weight"):
                p.zero_()
            elif name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                bound = (1.0 / fan_in) ** 0.5
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

    def forward(self, point: int, features, temb, context, full_res=FullRes.EXACT):
        return self.blocks[point](features, temb, context, full_res)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

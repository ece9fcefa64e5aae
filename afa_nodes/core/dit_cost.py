"""What the SABW aggregator costs next to one DiT expert, computed from the architectures' sizes:
parameters, and multiply-accumulates per model call (MACs; FLOPs = 2 x MACs) at a resolution.

Counted: every matrix product (linear layers per token, convolutions per position, attention
scores and attention-weighted values). Not counted (well under 1%): norms, activations, the
per-sample modulation layers of the DiTs, softmax. The aggregator sees the image tokens as a
grid (latent / patch size); its text input is the mean of the experts' raw text encodings.
`sabw_parameters` is exact (tests compare it with a built Aggregator).
"""
from dataclasses import dataclass

from .sabw import SABWConfig


@dataclass(frozen=True)
class DiTSize:
    """A DiT's size. kind "flux": `double` double-stream + `single` single-stream blocks;
    kind "mmdit": `double` joint blocks (`self_attn_blocks` of them with SD3.5's extra image
    self-attention); kind "qwen_image": `double` double-stream blocks (both streams updated in every
    block, as FLUX's double blocks)."""
    kind: str
    hidden: int
    double: int
    single: int = 0
    mlp_ratio: float = 4.0
    text_tokens: int = 256      # ComfyUI's T5 length for short prompts: FLUX 256, SD3 77 CLIP + 77 T5
    context_dim: int = 4096     # raw text encoding width (the aggregator's text input)
    patch: int = 2
    latent_down: int = 8        # pixels per latent cell
    final_channels: int = 64    # patch x patch x latent channels
    self_attn_blocks: int = 0

    def point_channels(self):
        return [self.hidden] * (self.double + self.single) + [self.final_channels]

    def grid_tokens(self, width_px: int, height_px: int) -> int:
        cell = self.latent_down * self.patch
        return -(-width_px // cell) * -(-height_px // cell)


# Published architectures (ComfyUI's configs): FLUX.1 [dev]/[schnell] and fine-tunes; SD3.5; Qwen-Image.
REAL_MODELS = {
    "FLUX.1 [dev]": DiTSize("flux", 3072, 19, 38, text_tokens=256),
    "SD3.5 large": DiTSize("mmdit", 2432, 38, text_tokens=154),
    "SD3.5 medium": DiTSize("mmdit", 1536, 24, text_tokens=154, self_attn_blocks=13),
    # Qwen2.5-VL text is not padded: 128 tokens stands for a ~90-word prompt
    "Qwen-Image": DiTSize("qwen_image", 3072, 60, text_tokens=128, context_dim=3584),
}


def _attention_macs(queries: int, keys: int, width: int) -> int:
    return 2 * queries * keys * width          # scores + weighted values


def expert_macs(size: DiTSize, tokens: int) -> int:
    """One expert, one model call, batch 1, `tokens` image tokens."""
    d, r, t = size.hidden, size.mlp_ratio, size.text_tokens
    s = tokens + t
    linear_per_token = int((4 + 2 * r) * d * d)           # qkv + proj + mlp (double: per stream; single: fused)
    block = s * linear_per_token + _attention_macs(s, s, d)
    total = (size.double + size.single) * block
    total += size.self_attn_blocks * (tokens * 4 * d * d + _attention_macs(tokens, tokens, d))
    if size.kind == "mmdit":                               # the last joint block updates the image only
        total -= int(t * (1 + 2 * r) * d * d)
    total += 2 * tokens * size.final_channels * d + t * size.context_dim * d     # img_in / final layer, txt_in
    return total


def sabw_point_parameters(channels: int, config: SABWConfig) -> int:
    d, n, e, c = config.hidden, config.num_models, config.time_embed_dim, config.context_dim
    resnet = 2 * (2 * d) + 2 * (9 * d * d + d) + (e * d + d)
    block = 3 * (2 * d) + (3 * d * d + d * d + d) + (d * d + 2 * c * d + d * d + d) + (d * 8 * d + 8 * d) + (4 * d * d + d)
    transformer = 2 * d + 2 * (d * d + d) + config.depth * block
    return (n * channels * d + d) + resnet + transformer + d * n


def sabw_parameters(point_channels, config: SABWConfig) -> int:
    return sum(sabw_point_parameters(c, config) for c in point_channels)


def sabw_point_macs(channels: int, config: SABWConfig, tokens: int, text_tokens: int) -> int:
    d, n = config.hidden, config.num_models
    macs = tokens * n * channels * d                                   # conv_in
    macs += 2 * tokens * 9 * d * d + config.time_embed_dim * d         # ResNet convolutions, time projection
    macs += 2 * tokens * d * d                                         # proj_in, proj_out
    per_block = (4 * tokens * d * d + _attention_macs(tokens, tokens, d)                       # self-attention
                 + 2 * tokens * d * d + 2 * text_tokens * config.context_dim * d
                 + _attention_macs(tokens, text_tokens, d)                                     # cross-attention
                 + tokens * d * 8 * d + tokens * 4 * d * d)                                    # GEGLU feed-forward
    macs += config.depth * per_block + tokens * d * n                  # + conv_out
    return macs


def sabw_macs(point_channels, config: SABWConfig, tokens: int, text_tokens: int) -> int:
    return sum(sabw_point_macs(c, config, tokens, text_tokens) for c in point_channels)


def aggregator_config(size: DiTSize, num_models: int, depth: int = 2) -> SABWConfig:
    """The paper's SABW (d 128, 8 heads) with the family's text and modulation widths."""
    return SABWConfig(num_models=num_models, depth=depth, context_dim=size.context_dim, time_embed_dim=size.hidden)


def cost_row(name: str, size: DiTSize, num_models: int = 2, pixels: int = 1024, depth: int = 2) -> dict:
    """Aggregator parameters and its MACs per call as a share of ONE expert's, at pixels x pixels."""
    config = aggregator_config(size, num_models, depth)
    tokens = size.grid_tokens(pixels, pixels)
    agg = sabw_macs(size.point_channels(), config, tokens, size.text_tokens)
    expert = expert_macs(size, tokens)
    return {"model": name, "models": num_models, "pixels": pixels, "sabw_depth": depth,
            "points": len(size.point_channels()), "aggregator_parameters": sabw_parameters(size.point_channels(), config),
            "expert_tflops": 2 * expert / 1e12, "aggregator_tflops": 2 * agg / 1e12, "share_of_one_expert": agg / expert}

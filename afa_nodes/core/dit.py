"""What the diffusion-transformer families (core/flux.py, core/mmdit.py) share: token streams
with an image grid, mixed at every aggregation point.

A DiT carries token streams of shape (batch, tokens, width) between its blocks. The image
tokens are 2x2 latent patches in row-major order, i.e. a (h/2 x w/2) grid: at a mixing point
that part of each stream is viewed as a picture (batch, width, grid_h, grid_w) and handed to
the engine's mixer, so SABW (or a training-free table) weighs the experts per grid position,
exactly as it weighs UNet features per pixel.

Tokens that are not on the grid (the text tokens; FLUX Kontext's reference-image tokens)
follow `text_mixing`:
  "own"    each expert keeps its own (the default, measured in BENCHMARKS.md): each expert's
           blocks see the text in their own representation, as each UNet expert keeps its
           own text context; fixed weights (1, 0, ...) reproduce expert 1 exactly;
  "mean"   averaged (1/N) wherever the image tokens were mixed;
  "first"  every expert continues with expert 1's text tokens.
"""
from dataclasses import dataclass

import torch

from .errors import AFAError

TEXT_MIXING = ("own", "mean", "first")


@dataclass(frozen=True)
class TokenGrid:
    """Where the image grid sits in a stream: `start` tokens before it (text in FLUX single
    blocks), then height x width grid tokens, then anything else (reference images)."""
    height: int
    width: int
    start: int = 0

    @property
    def end(self) -> int:
        return self.start + self.height * self.width

    def at(self, start: int) -> "TokenGrid":
        return TokenGrid(self.height, self.width, start)


def mean_of(tensors):
    """The mean of per-expert tensors; the tensor itself when they are all one object."""
    if all(t is tensors[0] for t in tensors):
        return tensors[0]
    return torch.stack(list(tensors)).mean(0)


def shared(streams) -> bool:
    return all(s is streams[0] for s in streams)


def private(streams):
    """Per-expert copies of streams that several experts share: ComfyUI's FLUX blocks add to
    their input in place, so one expert must never write into another's input."""
    if len(streams) == 1:
        return list(streams)
    seen, out = set(), []
    for s in streams:
        out.append(s.clone() if s is not None and id(s) in seen else s)
        if s is not None:
            seen.add(id(s))
    return out


def grid_view(tokens, grid: TokenGrid):
    """(batch, tokens, width) -> the grid part as a picture (batch, width, grid_h, grid_w) (a view)."""
    return tokens[:, grid.start:grid.end].transpose(1, 2).unflatten(2, (grid.height, grid.width))


def _tokens(picture):
    """(batch, width, h, w) -> (batch, h*w, width), contiguous."""
    return picture.flatten(2).transpose(1, 2).contiguous()


def mix_tokens(engine, point, streams, grid: TokenGrid, temb, cbar, text_mixing="own"):
    """Mix N experts' token streams at `point`: the grid tokens through the engine's mixer,
    the other tokens by `text_mixing`. -> (N streams, whether the mixer mixed at this point);
    the streams are [mixed] * N when every token is shared."""
    n = len(streams)
    if n == 1:
        return list(streams), False
    if text_mixing not in TEXT_MIXING:
        raise AFAError(f"unknown text mixing '{text_mixing}'; use one of {', '.join(TEXT_MIXING)}.")
    views = [grid_view(s, grid) for s in streams]
    mixed = engine.mix(point, views, temb, cbar)
    if not shared(mixed):                  # the mixer keeps the experts apart at this point
        return list(streams), False
    image = _tokens(mixed[0])
    length = streams[0].shape[1]
    if grid.start == 0 and grid.end == length:
        return [image] * n, True
    before = [s[:, :grid.start] for s in streams]
    after = [s[:, grid.end:] for s in streams]
    if text_mixing == "own":
        return [torch.cat([b, image, a], dim=1) for b, a in zip(before, after)], True
    if text_mixing == "mean":
        before, after = [mean_of(before)] * n, [mean_of(after)] * n
    else:  # "first"
        before, after = [before[0]] * n, [after[0]] * n
    return [torch.cat([before[0], image, after[0]], dim=1)] * n, True


def mix_text(streams, text_mixing, image_mixed: bool):
    """A stream that has no grid (FLUX's separate text stream in double blocks, SD3's context)."""
    n = len(streams)
    if n == 1 or text_mixing == "own" or not image_mixed or streams[0] is None:
        return list(streams)
    if text_mixing == "mean":
        return [mean_of(streams)] * n
    return [streams[0]] * n


def weight_group(index: int, num_blocks: int) -> str:
    """'fixed weights' groups for a DiT: the first third of the blocks (in execution order) is
    "input", the second "middle", the last third and the final prediction "output"."""
    third = index * 3 // max(num_blocks, 1)
    return ("input", "middle", "output")[min(third, 2)]

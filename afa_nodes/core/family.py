"""What every model family provides: its aggregation points and its layout (the family's
program for the ensemble).

A *layout* lists the family's aggregation points (in execution order, with each point's
feature width), says what must match between experts (`signature()`), and walks the
ensemble once (`walk(experts, inputs, engine)`): how each block is called and what is carried
between blocks (the skip stack of a UNet; image and text streams of a DiT). The executor
(core.ensemble) supplies the engine: it runs a block on every expert and mixes the outputs
at a point. A new family is a new Layout subclass plus its `derive` function, registered
in core/layout.py; the engine and the mixers stay as they are.
"""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AggregationPoint:
    stage: str       # family-specific block group, e.g. "input" | "middle" | "output" | "final"
    index: int       # block index within the stage (final: index of the last block)
    channels: int    # feature width of one model at this point

    @property
    def name(self) -> str:
        return self.stage if self.stage in ("middle", "final") else f"{self.stage} {self.index}"

    def to_dict(self):
        return asdict(self)


class Layout:
    """Base of every family's layout (a frozen dataclass with at least `points`,
    `context_dim` and `time_embed_dim`)."""
    family = "?"

    @property
    def point_channels(self):
        return [p.channels for p in self.points]

    @property
    def point_names(self):
        return [p.name for p in self.points]

    def signature(self) -> dict:
        """What must match between experts, and between an aggregator file and a MODEL."""
        raise NotImplementedError

    def points_signature(self) -> list:
        """[[stage, index, channels], ...]: the points part of every family's signature."""
        return [[p.stage, p.index, p.channels] for p in self.points]

    def weight_group(self, point: AggregationPoint) -> str:
        """Which group of 'fixed weights' ("input" | "middle" | "output") a point belongs to."""
        return "output" if point.stage == "final" else point.stage

    def describe(self) -> str:
        return (f"{self.family}: {len(self.points)} points, context {self.context_dim}, "
                f"channels {'/'.join(str(c) for c in sorted(set(self.point_channels)))}")

    def walk(self, experts, inputs: dict, engine):
        """Run the ensemble once: `inputs` holds the family's model inputs (x, timesteps,
        contexts, ...); `engine.run` runs a block on every expert, `engine.mix` mixes the
        outputs at a point. -> the prediction."""
        raise NotImplementedError


def signature_family(signature: dict) -> str:
    """Aggregator files written before families existed hold UNet signatures without the key."""
    return signature.get("family", "unet")

"""The aggregator file: `.safetensors` weights + JSON metadata under the key "afa".

Metadata: format version, the UNet layout it was trained on (points with channels,
context/time widths), N, the SABW config, the experts' names and sha256, and training
facts. Loading validates it against the ensemble it is applied to.
Also imports the research code's layout (aggregator_{j}/aggregator.safetensors + config.json).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import logger
from .errors import AggregatorFileError, AggregatorMismatchError
from .files import atomic_write
from .family import Layout, signature_family
from .sabw import Aggregator, SABWConfig

FORMAT_VERSION = 1
MAX_METADATA_BYTES = 1 << 20   # an aggregator's metadata is a few KB


@dataclass
class AggregatorFile:
    config: SABWConfig
    layout: dict                 # Layout.signature() of the experts it was trained on
    experts: list                # [{"name": str, "sha256": str}]
    training: dict = field(default_factory=dict)
    state_dict: dict = field(default_factory=dict)
    path: str = ""

    def build(self, ops=None, dtype=torch.float32, device="cpu") -> Aggregator:
        channels = [c for _, _, c in self.layout["points"]]
        agg = Aggregator(channels, self.config, **({"ops": ops} if ops is not None else {}))
        if self.state_dict:
            missing, unexpected = agg.load_state_dict(self.state_dict, strict=False)
            if missing or unexpected:
                raise AggregatorFileError(
                    f"{self.path or 'aggregator'}: weights do not fit its own metadata "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the file is damaged, re-train or re-export it.")
        return agg.to(device=device, dtype=dtype)


def save_aggregator(path, aggregator: Aggregator, layout: Layout, experts, training=None):
    meta = {"format_version": FORMAT_VERSION, "family": layout.family,
            "num_models": aggregator.config.num_models, "config": aggregator.config.to_dict(),
            "layout": layout.signature(), "point_names": layout.point_names,
            "experts": list(experts), "training": training or {}}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in aggregator.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"afa": json.dumps(meta)}))


def load_aggregator(path) -> AggregatorFile:
    path = Path(path)
    if not path.is_file():
        raise AggregatorFileError(f"aggregator file not found: {path}. Put .safetensors aggregators in "
                                  "ComfyUI/models/afa/ (train one with AFA Train Aggregator) or pick 'none'.")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for bad files
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a raw pickle
            raise AggregatorFileError(f"{path.name} is a PyTorch/pickle file named .safetensors: this pack never "
                                      "unpickles files (they can run code). Use a real .safetensors aggregator.") from None
        raise AggregatorFileError(f"{path.name} is not a readable .safetensors file ({e}); "
                                  "it may be truncated or of another format. Re-download or re-train it.") from e
    if "afa" not in metadata:
        raise AggregatorFileError(f"{path.name} has no AFA metadata: it is not an AFA aggregator "
                                  "(maybe a checkpoint or LoRA put in models/afa by mistake).")
    meta = _read_metadata(path.name, metadata["afa"])
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AggregatorFileError(f"{path.name} holds NaN/inf weights ({', '.join(bad[:3])}"
                                  f"{' ...' if len(bad) > 3 else ''}): it came from a diverged training. "
                                  "Re-train it (a lower learning rate) or use an earlier file.")
    return AggregatorFile(config=meta["config"], layout=meta["layout"],
                          experts=meta.get("experts", []), training=meta.get("training", {}),
                          state_dict=tensors, path=str(path))


def _read_metadata(name: str, text: str) -> dict:
    """The "afa" metadata JSON checked for what loading needs (config -> SABWConfig); typed errors."""
    damaged = f"{name}: its AFA metadata is damaged ({{}}); re-train or re-export the aggregator."
    if len(text) > MAX_METADATA_BYTES:
        raise AggregatorFileError(f"{name}: its AFA metadata is {len(text) / 2**20:.1f} MB, an aggregator's is "
                                  f"a few KB (limit {MAX_METADATA_BYTES // 2**20} MB): not a file this pack "
                                  "wrote. Re-train or re-export the aggregator.")
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise AggregatorFileError(damaged.format(f"not JSON: {e}")) from None
    if not isinstance(meta, dict):
        raise AggregatorFileError(damaged.format(f"a JSON {type(meta).__name__}, not an object"))
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise AggregatorFileError(damaged.format(f"format_version {version!r}"))
    if version > FORMAT_VERSION:
        raise AggregatorFileError(f"{name} uses aggregator format {version}, "
                                  f"this ComfyUI-AFA reads up to {FORMAT_VERSION}: update the pack.")
    layout = meta.get("layout")
    if not isinstance(layout, dict) or not isinstance(layout.get("points"), list):
        raise AggregatorFileError(damaged.format("no 'layout' with 'points'"))
    for key, kind in (("experts", list), ("training", dict)):
        if not isinstance(meta.get(key, kind()), kind):
            raise AggregatorFileError(damaged.format(f"'{key}' is not a {kind.__name__}"))
    try:
        meta["config"] = SABWConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise AggregatorFileError(damaged.format(f"bad 'config': {e}")) from None
    return meta


def check_fits(agg_file: AggregatorFile, layout: Layout, expert_names, expert_hashes=None):
    """Raise AggregatorMismatchError if the file cannot drive this ensemble; warn if it was
    trained on other experts (it will run, but was not trained for them)."""
    name = Path(agg_file.path).name or "aggregator"
    n = len(expert_names)
    if agg_file.config.num_models != n:
        raise AggregatorMismatchError(
            f"{name} was trained for {agg_file.config.num_models} models, this ensemble has {n} "
            f"({', '.join(expert_names)}). Use an aggregator trained on these models, train one, or pick 'none'.")
    ours, theirs = layout.signature(), agg_file.layout
    if signature_family(theirs) != signature_family(ours):
        raise AggregatorMismatchError(
            f"{name} was trained for {signature_family(theirs)} models, this ensemble is of {layout.family} "
            f"models ({', '.join(expert_names)}). Use an aggregator trained for this model family.")
    if theirs != ours:
        diff = [k for k in ours if ours[k] != theirs.get(k)]
        raise AggregatorMismatchError(
            f"{name} was trained on another architecture ({', '.join(diff)} differ: "
            f"{len(theirs['points'])} points / context {theirs['context_dim']} in the file vs "
            f"{len(ours['points'])} / {ours['context_dim']} here). Use an aggregator made for these models.")
    if expert_hashes and agg_file.experts:
        trained = [e.get("sha256") for e in agg_file.experts]
        if list(expert_hashes) != trained:
            logger.warning("%s was trained on %s, not on %s: it will run, but its weights were not "
                           "learned for these models (same order matters).", name,
                           [e.get("name") for e in agg_file.experts], list(expert_names))
            return False
    return True


def import_research_aggregator(folder, layout: Layout) -> AggregatorFile:
    """Read the research code's save format: folder/aggregator_{j}/{aggregator.safetensors,config.json}."""
    folder = Path(folder)
    parts = sorted(folder.glob("aggregator_*/config.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if len(parts) != len(layout.points):
        raise AggregatorMismatchError(f"{folder} holds {len(parts)} aggregator_j folders, "
                                      f"this architecture has {len(layout.points)} aggregation points.")
    state, config = {}, None
    for j, cfg_path in enumerate(parts):
        cfg = json.loads(cfg_path.read_text())
        weights = load_file(str(cfg_path.parent / "aggregator.safetensors"))
        depth = len({k.split(".")[2] for k in weights if k.startswith("transformer.transformer_blocks.")})
        config = SABWConfig(num_models=cfg["num_experts"], hidden=cfg["hidden_size"], heads=cfg["num_attn_heads"],
                            depth=depth, context_dim=cfg["cross_attn_dim"], time_embed_dim=cfg["temb_channels"])
        if cfg["in_channels"] != layout.points[j].channels:
            raise AggregatorMismatchError(f"{cfg_path.parent.name} has {cfg['in_channels']} channels, "
                                          f"point {layout.points[j].name} has {layout.points[j].channels}.")
        state.update({f"blocks.{j}.{k}": v for k, v in weights.items()})
    return AggregatorFile(config=config, layout=layout.signature(), experts=[],
                          training={"source": "research-code import", "folder": folder.name},
                          state_dict=state, path=str(folder))

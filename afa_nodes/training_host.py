"""ComfyUI adapter of core.train: the frozen experts (service.models.ExpertSet: ModelPatchers,
names, hashes), their layout and noise schedule, and the dataset encoded with their CLIP and
VAE. No AFA MODEL is needed; `prepare` returns everything core.train takes.

ComfyUI runs nodes under torch.inference_mode(), so parameters of models loaded by loader
nodes are inference tensors, which autograd refuses to save for backward. Training runs in
`torch.inference_mode(False)` + `torch.enable_grad()`, and `make_autograd_ready` replaces the
frozen UNets' inference tensors once, in place, by plain copies (same values; the memory of
one tensor at a time is duplicated while swapping).

Data: images -> VAE latents (raw, cached) -> `process_latent_in` of expert 1; captions -> the
(per-model) CLIP, split per model with `split_per_model`. Both are cached under
`<dataset>/.afa_cache` (see core.encode_cache), keyed by the encoders' weights. Captions are cut
to the length of the empty caption's encoding (one chunk per text encoder: 77 tokens for CLIP,
CLIP + T5 for SD3) so every sample has the same context shape.

Objective (`noise_schedule`): the experts' own model sampling: eps-MSE for EPS models; for flow
models (CONST: SD3, FLUX) x_t = (1 - sigma) x0 + sigma noise, target the velocity noise - x0,
sigma from the model's shifted sigmas table at a uniform index (docs/dit-ensembles.md). DiTs:
adapters of ensemble_model.dit_experts bound per call (`TrainingDiT`), y = the pooled text per
model, guidance-distilled FLUX fed GUIDANCE.
Crops: center, or `crop_variants` seeded random crops per training image cached once (each
epoch picks one); validation always uses the center crop. Aspect-ratio buckets (optional):
each image goes to the bucket nearest its aspect ratio, and batches stay inside a bucket.
Models with a label input y (SDXL family): the text cache also keeps the pooled output, and
y is built as at sampling: expert 1's `encode_adm` of the stacked pooled output with the
SDXL size conditioning of the image (original size, crop top-left in the resized image,
target size), split per model by `split_adm`; a dropped caption gets the empty caption's
pooled output with the same sizes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.model_sampling

from . import logger
from .comfy_unet import ComfyExpert, split_adm, split_per_model
from .core.aggregator_file import load_aggregator
from .core.dataset import ImageDataset, split_indices
from .core.encode_cache import CachedLatentDataset, build_latent_cache, build_text_cache
from .core.errors import AFAError, IncompatibleModelsError, TrainingError
from .core.layout import Layout, check_same_layout, derive_layout
from .core.train import NoiseSchedule, TrainData
from .core.train_config import Comm, TrainConfig
from .training_dit import TrainingDiT, guidance_of, objective_meta, pooled_maker, pooled_width

TOKENS = 77
CACHE_DIR = ".afa_cache"


class TrainingExpert(ComfyExpert):
    """A frozen ComfyUI UNet for the training loop: inputs cast to the UNet's compute dtype."""

    def __init__(self, unet, dtype):
        super().__init__(unet, {}, torch.empty(0, dtype=dtype), {})

    def embed(self, timesteps, y, dtype):
        return super().embed(timesteps, None if y is None else y.to(self.dtype), self.dtype)

    def run_block(self, stage, index, h, emb, context, output_shape=None):
        return super().run_block(stage, index, h.to(self.dtype), emb, context.to(self.dtype), output_shape)


def make_autograd_ready(module: torch.nn.Module) -> int:
    """Replace inference tensors (parameters, buffers) of `module` by plain frozen copies; returns
    how many were replaced. Idempotent: a second call finds nothing to replace."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    replaced += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    replaced += 1
    module.requires_grad_(False)
    return replaced


def noise_schedule(experts) -> NoiseSchedule:
    """The experts' own schedule and prediction from expert 1's model_sampling (EPS or CONST flow
    with a sigmas table; every expert must predict the same way on the same schedule)."""
    samplings = [p.get_model_object("model_sampling") for p in experts.patchers]
    sampling = samplings[0]
    flow = isinstance(sampling, comfy.model_sampling.CONST)
    if not (flow or isinstance(sampling, comfy.model_sampling.EPS)) or not hasattr(sampling, "sigmas"):
        raise TrainingError(f"the models use {type(sampling).__name__}: AFA training needs epsilon-prediction "
                            "(SD1.x, SDXL) or flow-matching (SD3, FLUX) models; v-prediction is not supported yet.")
    with torch.inference_mode(False):
        sigmas = sampling.sigmas.detach().clone().float().cpu()
        for model, other, name in zip(experts.models[1:], samplings[1:], experts.names[1:]):
            same = (model.model_type == experts.models[0].model_type and hasattr(other, "sigmas")
                    and other.sigmas.shape == sampling.sigmas.shape
                    and torch.allclose(other.sigmas.float().cpu(), sigmas))
            if not same:
                raise IncompatibleModelsError(
                    f"'{name}' predicts {model.model_type.name} on another noise schedule than '{experts.names[0]}' "
                    f"({experts.models[0].model_type.name}); an aggregator is trained for experts of one prediction "
                    "type and schedule (e.g. all SD1.5 eps fine-tunes, or FLUX.1 [dev] fine-tunes of one shift).")
    return NoiseSchedule(sigmas=sigmas, timestep=lambda sigma: sampling.timestep(sigma).float(),
                         calculate_input=sampling.calculate_input, prediction="flow" if flow else "eps")


def experts_layout(experts) -> Layout:
    """The experts' shared layout (IncompatibleModelsError naming the model that differs)."""
    layouts = [derive_layout(m.diffusion_model, name) for m, name in zip(experts.models, experts.names)]
    check_same_layout(layouts, experts.names)
    return layouts[0]


def expert_info(experts) -> list:
    """[{name, sha256}] per expert, as the aggregator file records them."""
    out = [{"name": name, "sha256": digest} for name, digest in zip(experts.names, experts.hashes)]
    if not all(e["sha256"] for e in out):
        logger.warning("the checkpoint files of %s are unknown (models from AFA Ensemble): the aggregator "
                       "records their names only; resuming checks names, not file hashes",
                       [e["name"] for e in out if not e["sha256"]])
    return out


# Weights that do not affect what is cached and that some checkpoints leave uninitialised
# (SD1.x files carry no CLIP text_projection: ComfyUI keeps whatever memory held).
_UNUSED_WEIGHTS = ("text_projection", "logit_scale")


def _fingerprint(*modules, extra="") -> str:
    """Cheap identity of encoder weights for cache keys: names, shapes and a few values per tensor."""
    digest = hashlib.sha256(extra.encode())
    with torch.inference_mode(False), torch.no_grad():
        for module in modules:
            for name, t in module.state_dict().items():
                if any(u in name for u in _UNUSED_WEIGHTS):
                    continue
                flat = t.detach().flatten()
                sample = torch.cat([flat[:64], flat[-64:]]).float().cpu()
                digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


class _Samples:
    """CachedLatentDataset -> core.train samples: model latent, per-model contexts and, with
    `make_ys`, per-model y for the caption and for the empty caption."""

    def __init__(self, dataset: CachedLatentDataset, process_in, n, width, make_ys=None, empty_pooled=None,
                 tokens=TOKENS):
        self.dataset, self.process_in, self.n, self.width = dataset, process_in, n, width
        self.make_ys, self.empty_pooled, self.tokens = make_ys, empty_pooled, tokens

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k):
        return self.at(k, self.dataset.epoch)

    def at(self, k, epoch):
        item = self.dataset.at(k, epoch)
        latent = self.process_in(item["latent"][None].float())[0]
        text = item["text"]["clip"]
        what = f"the encoding of caption {item['caption'][:40]!r}"
        sample = {"latent": latent, "contexts": split_per_model(text["cond"][:self.tokens].float(), self.n, self.width,
                                                                what)}
        if self.make_ys is not None:
            sample["ys"] = self.make_ys(text["pooled"], item)
            sample["empty_ys"] = self.make_ys(self.empty_pooled, item)
        return sample


def adm_maker(base, n: int, adm_dim: int):
    """(pooled output, dataset item) -> y per model, built the way the AFA MODEL builds it at
    sampling (expert 1's `base.encode_adm` of the per-model stack, then split_adm), with the
    item's SDXL size conditioning: original size, crop top-left in the resized image, target size."""

    def make(pooled, item):
        (w, h), (_, _, left, top), (tw, th) = item["size"], item["crop_box"], item["target"]
        y = base.encode_adm(pooled_output=pooled[None].float(), width=w, height=h, crop_w=left, crop_h=top,
                            target_width=tw, target_height=th, device=torch.device("cpu"), prompt_type="positive")
        if y is None:
            raise TrainingError(f"{type(base).__name__} builds no label input y from a pooled text output; "
                                "AFA training supports SD1.x/SD2.x and SDXL-family models.")
        try:
            return [t[0].float() for t in split_adm(y, n, adm_dim)]
        except AFAError as e:
            raise TrainingError(f"{e} The pooled text output has width {pooled.shape[-1]}: use the CLIP of the "
                                "same checkpoints (one pooled output per model, e.g. from AFA CLIP Merge).") from e
    return make


def _encode_texts(clip, pooled: bool):
    def encode(captions):
        out = []
        for caption in captions:
            enc = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True, return_dict=True)
            item = {"cond": enc["cond"][0].float().cpu()}
            if pooled:
                if enc.get("pooled_output") is None:
                    raise TrainingError("the CLIP gives no pooled output, which models with a pooled text input "
                                        "(SDXL, SD3, FLUX) need: use the models' own text encoders (or AFA CLIP Merge).")
                item["pooled"] = enc["pooled_output"][0].float().cpu()
            out.append(item)
        return out
    return encode


def data_seed(out_path, seed: int, resume: bool) -> int:
    """On resume the file's seed wins (as in core.train), so the split and the crops match the run."""
    if not (resume and out_path is not None and Path(out_path).exists()):
        return seed
    try:
        return int(load_aggregator(out_path).training.get("config", {}).get("seed", seed))
    except AFAError:  # unreadable: the trainer reports it
        return seed


def _data_meta(dataset: ImageDataset, folder: Path, train_idx, val_idx, variants: int, buckets: bool,
               adm: bool, family: str = "unet") -> dict:
    """The data settings recorded in the aggregator file (and compared on resume)."""
    meta = {"dataset": folder.name, "images": len(dataset.entries), "train_images": len(train_idx),
            "val_images": len(val_idx), "resolution": dataset.resolution, "crop": dataset.crop,
            "crop_variants": variants, "val_crop": "center", "buckets": bool(buckets)}
    if meta["buckets"]:
        sizes = [f"{e.target[0]}x{e.target[1]}" for e in dataset.entries]
        meta["bucket_images"] = {size: sizes.count(size) for size in sorted(set(sizes))}
    if adm:
        meta["label_input"] = ("pooled text + original size, crop top-left, target size (SDXL)" if family == "unet"
                               else "pooled text vector")
    return meta


def latent_io(base_model, encode):
    """(VAE encode, process_latent_in) for training on (B, C, h, w) latents. A model whose latent
    format has a frame axis (Qwen-Image: Wan 2.1 latents, one frame per image) gets single-frame
    VAE latents without it, and the axis added around its process_latent_in; its experts run
    4-D latents as one frame (comfy_qwen)."""
    if getattr(base_model.latent_format, "latent_dimensions", 2) != 3:
        return encode, base_model.process_latent_in

    def encode_frame(images):
        latent = encode(images)
        return latent[:, :, 0] if latent.ndim == 5 and latent.shape[2] == 1 else latent
    return encode_frame, lambda latent: base_model.process_latent_in(latent.unsqueeze(2)).squeeze(2)


def encode_dataset(experts, clip, vae, config: TrainConfig, seed: Optional[int] = None, comm: Optional[Comm] = None,
                   status: Optional[Callable[[str], None]] = None, layout: Optional[Layout] = None):
    """config.dataset -> (TrainData, data metadata), with config's resolution, split, crops and
    buckets and the split/crop seed `seed` (default config.seed). Rank 0 fills the caches first,
    other ranks reuse them."""
    layout = layout or experts_layout(experts)
    seed = config.seed if seed is None else seed
    comm = comm or Comm.current()
    folder = Path(config.dataset)
    cache_dir = Path(config.cache_dir) if config.cache_dir else folder / CACHE_DIR
    crop, buckets = config.crop, config.buckets
    dataset = ImageDataset(folder, resolution=config.resolution, crop=crop, seed=seed, bucketing=buckets)
    if buckets and len(dataset.buckets) == 1:
        logger.warning("resolution %d has a single aspect-ratio bucket %s (sides are multiples of 64, at most 2:1): "
                       "every image is cropped square; use 192 or more for real buckets", config.resolution,
                       dataset.buckets[0])
    train_idx, val_idx = split_indices(len(dataset.entries), config.val_fraction, seed)
    variants = config.crop_variants if crop == "random" else 1
    adm = bool(pooled_width(layout))
    others = getattr(clip, "others", [])
    vae_key = f"vae-{_fingerprint(vae.first_stage_model)}"
    clips = [clip] + others
    # clip skip changes the encoding; LoRA patches too (their uuid changes whenever patches change)
    settings = "|".join(f"{c.layer_idx}:{getattr(c.patcher, 'patches_uuid', '') if c.patcher.patches else ''}"
                        for c in clips)
    clip_key = f"clip-{len(clips)}-{_fingerprint(*[c.cond_stage_model for c in clips], extra=settings)}"
    clip_key += "-pooled" if adm else ""
    say = status or (lambda text: None)
    encode, process_in = latent_io(experts.models[0], vae.encode)

    def build():
        say(f"encoding {len(dataset.entries)} image(s) with the VAE"
            + (f" ({variants} random crops per training image)" if crop == "random" else ""))
        if crop == "center":
            train_lat = val_lat = build_latent_cache(dataset, encode, vae_key, cache_dir)
        else:
            train_lat = build_latent_cache(dataset, encode, vae_key, cache_dir, crop_variants=variants,
                                           indices=train_idx)
            val_lat = build_latent_cache(dataset.with_crop("center"), encode, vae_key, cache_dir,
                                         indices=val_idx)
        say(f"encoding {len(set(dataset.captions))} caption(s) with {len(others) + 1} text encoder(s)")
        texts = build_text_cache(dataset.captions, _encode_texts(clip, adm), clip_key, cache_dir)
        return train_lat, val_lat, texts
    if comm.world_size > 1:  # one rank encodes, the others then find everything cached
        if comm.rank == 0:
            built = build()
        torch.distributed.barrier()
        if comm.rank != 0:
            built = build()
    else:
        built = build()
    train_lat, val_lat, texts = built
    n, width = len(experts.names), layout.context_dim
    empty_text = texts.get("")
    tokens = empty_text["cond"].shape[0] if layout.family != "unet" else TOKENS
    longer = [c for c in set(dataset.captions) if texts.get(c)["cond"].shape[0] > tokens]
    if longer:
        logger.warning("%d caption(s) longer than one chunk per text encoder are cut to %d tokens, e.g. %r",
                       len(longer), tokens, longer[0][:60])
    make_ys = None
    if adm:
        make_ys = (adm_maker(experts.models[0], n, layout.adm_dim) if layout.family == "unet"
                   else pooled_maker(n, pooled_width(layout)))
    extra = dict(make_ys=make_ys, empty_pooled=empty_text.get("pooled"), tokens=tokens)
    train_set = CachedLatentDataset(train_lat, {"clip": texts}, train_idx, repeats=True, seed=seed)
    val_set = CachedLatentDataset(val_lat, {"clip": texts}, val_idx, repeats=False, seed=seed)
    train = _Samples(train_set, process_in, n, width, **extra)
    val = _Samples(val_set, process_in, n, width, **extra)
    empty = split_per_model(empty_text["cond"][:tokens].float(), n, width, "the empty caption's encoding")
    meta = _data_meta(dataset, folder, train_idx, val_idx, variants, buckets, adm, layout.family)
    data = TrainData(train=train, val=val, empty_contexts=empty,
                     train_buckets=train_set.buckets, val_buckets=val_set.buckets)
    return data, meta


def ready_for_training(experts) -> int:
    """Load every expert fully on the compute device and make it usable by autograd (again after
    a sample image was rendered between steps); returns how many tensors were replaced."""
    patchers, seen = [], set()
    for p in experts.patchers:
        if id(p.model) not in seen:  # load_models_gpu unloads other clones of one BaseModel
            seen.add(id(p.model))
            patchers.append(p)
    comfy.model_management.load_models_gpu(patchers, force_full_load=True)
    return sum(make_autograd_ready(base.diffusion_model) for base in experts.models)


def load_experts(experts, layout: Optional[Layout] = None) -> list:
    """`ready_for_training`, and the experts as core.train runs them."""
    replaced, out = ready_for_training(experts), []
    for base in experts.models:
        dtype = base.manual_cast_dtype or base.get_dtype()
        if layout is not None and layout.family != "unet":
            out.append(TrainingDiT(base.diffusion_model, layout.family, dtype, guidance_of(layout)))
        else:
            out.append(TrainingExpert(base.diffusion_model, dtype))
    if replaced:
        logger.info("made %d inference tensor(s) of the frozen models usable for backprop", replaced)
    return out


@dataclass
class Prepared:
    """Everything core.train takes for these experts and this config."""
    experts: list             # TrainingExpert per expert, loaded on `device`
    layout: Layout
    data: TrainData
    data_meta: dict           # the data settings recorded in the aggregator file
    schedule: NoiseSchedule
    info: list                # [{name, sha256}] per expert
    device: torch.device
    seed: int                 # the seed of the split, crops and draws
    objective: dict           # the objective's facts recorded in the aggregator file (objective_meta)


def prepare(experts, clip, vae, config: TrainConfig, seed: Optional[int] = None, comm: Optional[Comm] = None,
            status: Optional[Callable[[str], None]] = None) -> Prepared:
    """Checks the experts (one layout, one eps or flow schedule), encodes the dataset and loads the experts
    for autograd. Call under torch.inference_mode(False)."""
    if clip is None or vae is None:
        raise TrainingError(f"{', '.join(experts.names)}: AFA training needs the CLIP and the VAE of the models "
                            "(full checkpoints, or the loader's CLIP and VAE outputs).")
    layout = experts_layout(experts)
    schedule = noise_schedule(experts)
    seed = config.seed if seed is None else seed
    data, data_meta = encode_dataset(experts, clip, vae, config, seed, comm, status, layout)
    if status:
        status(f"loading {len(experts.names)} models for training")
    loaded = load_experts(experts, layout)
    return Prepared(loaded, layout, data, data_meta, schedule, expert_info(experts),
                    comfy.model_management.get_torch_device(), seed, objective_meta(experts, schedule, layout))

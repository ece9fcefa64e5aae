"""ComfyUI layer: turns N ModelPatchers into ONE MODEL that runs the AFA ensemble.

The result is a clone of expert 1 whose UNet forward is replaced by a DIFFUSION_MODEL
wrapper running `core.ensemble.EnsembleExecutor` over all experts. The other experts
and the aggregator are `additional_models` of that clone, so ComfyUI's memory manager
loads and offloads them together with it. Module references live in closures and
attachments (never in model_options, which clone() deep-copies).
"""
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension

from . import logger
from .comfy_unet import ComfyExpert, ComfyHooks, split_adm, split_per_model
from .core.ensemble import (EnsembleExecutor, SABWMixer, fixed_weights_mixer,
                             noise_average_mixer, uniform_mixer)
from .core.errors import AFAError, IncompatibleModelsError
from .core.layout import UNetLayout, check_same_layout, derive_layout

KEY = "afa"
MODES = ["aggregator", "block-wise average", "noise average", "fixed weights", "single model"]
MIN_MODELS, MAX_MODELS = 2, 6
# Activation memory ComfyUI reserves, relative to one model: the stacked N features and
# the aggregator's attention come on top of one UNet's activations.
MEMORY_FACTOR = 2.0


@dataclass
class Ensemble:
    """Everything resolved once per MODEL; attached to the patcher under "afa"."""
    names: list
    hashes: list
    models: list                  # BaseModel per expert (repeats allowed: same checkpoint twice)
    layout: UNetLayout
    mode: str
    mixer: object = None
    aggregator: Optional[torch.nn.Module] = None
    aggregator_patcher: object = None
    single_index: int = 0
    recorder: Optional[Callable] = None   # recorder(point, weights, transformer_options)
    info: dict = field(default_factory=dict)

    @property
    def num_models(self):
        return len(self.models)


def get_ensemble(model) -> Optional[Ensemble]:
    return model.get_attachment(KEY) if hasattr(model, "get_attachment") else None


def require_ensemble(model, what="this node") -> Ensemble:
    ensemble = get_ensemble(model)
    if ensemble is None:
        raise AFAError(f"{what} needs an AFA MODEL (from AFA Ensemble Loader or AFA Ensemble); "
                       "the MODEL given is a plain model.")
    return ensemble


def make_mixer(ensemble: Ensemble, weights=None):
    layout, n = ensemble.layout, ensemble.num_models
    points = len(layout.points)
    if ensemble.mode == "aggregator":
        return SABWMixer(ensemble.aggregator, refresh_every=ensemble.info.get("refresh_every", 1))
    if ensemble.mode == "block-wise average":
        return uniform_mixer(points, n)
    if ensemble.mode == "noise average":
        return noise_average_mixer(points, n)
    if ensemble.mode == "fixed weights":
        return fixed_weights_mixer(layout, parse_weights(weights or "", n))
    return uniform_mixer(points, 1)  # single model: one expert runs, nothing to mix


def parse_weights(text: str, n: int) -> dict:
    """"0.6, 0.4" (all blocks) or "input: 1,0; middle: .5,.5; output: 0,1" -> {group: [w]}."""
    groups = {}
    text = text.strip() or ",".join(["1"] * n)
    for part in text.split(";"):
        name, _, values = part.rpartition(":")
        name = name.strip().lower() or "all"
        try:
            w = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise AFAError(f"cannot read weights '{part.strip()}': write numbers separated by commas, "
                           "e.g. '0.6, 0.4' or 'input: 1,0; middle: .5,.5; output: 0,1'.")
        if len(w) != n:
            raise AFAError(f"weights '{part.strip()}' give {len(w)} numbers for {n} models.")
        if name not in ("all", "input", "middle", "output"):
            raise AFAError(f"unknown block group '{name}' in weights: use input, middle or output.")
        for g in (("input", "middle", "output") if name == "all" else (name,)):
            groups[g] = w
    missing = {"input", "middle", "output"} - set(groups)
    if missing:
        raise AFAError(f"weights give no values for {sorted(missing)}; give all three groups or one list.")
    return groups


def _diffusion_wrapper(ensemble: Ensemble, executor_core: EnsembleExecutor):
    def afa_diffusion_model(executor, x, timesteps, context=None, y=None, control=None,
                            transformer_options={}, *args, **kwargs):
        unets = [executor.class_obj] + [m.diffusion_model for m in ensemble.models[1:]]
        n = len(unets)
        contexts = split_per_model(context, n, ensemble.layout.context_dim, "the text context")
        ys = split_adm(y, n, ensemble.layout.adm_dim) if ensemble.layout.adm_dim else [y] * n
        if ensemble.mode == "single model":
            k = ensemble.single_index
            unets, contexts, ys = [unets[k]], [contexts[k]], [ys[k]]
        experts = [ComfyExpert(u, transformer_options, x, kwargs) for u in unets]
        recorder = None
        if ensemble.recorder is not None:
            def recorder(point, w):
                ensemble.recorder(point, w, transformer_options)
        step = None
        if ensemble.info.get("refresh_every", 1) > 1 and "sigmas" in transformer_options:
            step = (float(transformer_options["sigmas"].max()), tuple(transformer_options.get("cond_or_uncond", ())))
        return executor_core(experts, x, timesteps, contexts, ys, ComfyHooks(control, transformer_options),
                             recorder, step)
    return afa_diffusion_model


def _prepare_sampling_wrapper(executor, model, noise_shape, *args, **kwargs):
    """Reserve activation memory for the ensemble, not for one model."""
    base = model.model
    own = base.__dict__.get("memory_required")
    original = base.memory_required
    base.memory_required = lambda *a, **k: original(*a, **k) * MEMORY_FACTOR
    try:
        return executor(model, noise_shape, *args, **kwargs)
    finally:
        if own is None:
            del base.memory_required
        else:
            base.memory_required = own


def install(patcher, ensemble: Ensemble):
    """(Re)install the ensemble on `patcher` (a clone): repeatable, removes before adding."""
    ensemble.mixer = make_mixer(ensemble, ensemble.info.get("weights"))
    executor_core = EnsembleExecutor(ensemble.layout, ensemble.mixer)
    for kind, fn in ((comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, _diffusion_wrapper(ensemble, executor_core)),
                     (comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, _prepare_sampling_wrapper)):
        patcher.remove_wrappers_with_key(kind, KEY)
        patcher.add_wrapper_with_key(kind, KEY, fn)
    patcher.set_attachments(KEY, ensemble)


def with_recorder(model, recorder):
    """A clone of an AFA MODEL whose runs report every weight map to `recorder`."""
    ensemble = require_ensemble(model, "recording")
    clone = model.clone()
    install(clone, replace(ensemble, recorder=recorder))
    return clone


def aggregator_patcher(aggregator_file, layout: UNetLayout, dtype):
    """The aggregator as a ModelPatcher built from comfy.ops layers (low-VRAM streaming)."""
    module = aggregator_file.build(ops=comfy.ops.manual_cast, dtype=dtype)
    module.eval().requires_grad_(False)
    return module, comfy.model_patcher.ModelPatcher(
        module, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def build_ensemble(patchers, names, hashes=None, mode="block-wise average", aggregator_file=None,
                   weights="", single_index=1, sources=None, refresh_every=1):
    """N ModelPatchers -> one AFA MODEL (a clone of the first). `single_index` is 1-based;
    `sources` are the checkpoint paths when known (training hashes them); `refresh_every`
    k > 1 re-uses the aggregator's maps for k steps (faster, approximate)."""
    from .core.aggregator_file import check_fits
    n = len(patchers)
    if not MIN_MODELS <= n <= MAX_MODELS:
        raise AFAError(f"an AFA ensemble needs {MIN_MODELS} to {MAX_MODELS} models, got {n}. "
                       "Connect at least two checkpoints.")
    if mode not in MODES:
        raise AFAError(f"unknown mode '{mode}'; choose one of {MODES}.")
    hashes = list(hashes) if hashes else [None] * n
    for p, name in zip(patchers, names):
        if get_ensemble(p) is not None:
            raise AFAError(f"'{name}' is already an AFA ensemble; connect the base models instead.")
    unique = _unique_models(patchers, names)
    layouts = [derive_layout(p.model.diffusion_model, name) for p, name in zip(patchers, names)]
    check_same_layout(layouts, names)
    _check_same_prediction(patchers, names)
    layout = layouts[0]
    primary = patchers[0].clone()
    ensemble = Ensemble(names=list(names), hashes=hashes, models=[p.model for p in patchers], layout=layout,
                        mode=mode, single_index=single_index - 1,
                        info={"weights": weights, "sources": list(sources) if sources else None,
                              "refresh_every": max(1, int(refresh_every))})
    if mode == "single model" and not 0 <= single_index - 1 < n:
        raise AFAError(f"model index {single_index} is out of range: the ensemble has models 1 to {n}.")
    extra = [p for p in unique if p.model is not primary.model]
    if mode == "aggregator":
        if aggregator_file is None:
            raise AFAError("mode 'aggregator' needs an aggregator file: pick one from models/afa, "
                           "or a training-free mode such as 'block-wise average'.")
        check_fits(aggregator_file, layout, names, hashes if all(hashes) else None)
        dtype = primary.model_dtype()
        dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        ensemble.aggregator, ensemble.aggregator_patcher = aggregator_patcher(aggregator_file, layout, dtype)
        extra.append(ensemble.aggregator_patcher)
    primary.set_additional_models(KEY, [p.clone() if p.model is not primary.model else p for p in extra])
    install(primary, ensemble)
    logger.info("AFA ensemble of %d models (%s), mode '%s', %d aggregation points",
                n, ", ".join(names), mode, len(layout.points))
    return primary


def _unique_models(patchers, names):
    """Experts sharing one BaseModel must carry the same patches (one set of weights in memory)."""
    seen = {}
    for p, name in zip(patchers, names):
        first = seen.setdefault(id(p.model), (p, name))
        if first[0] is not p and not first[0].clone_has_same_weights(p):
            raise AFAError(f"'{first[1]}' and '{name}' are the same loaded checkpoint with different patches "
                           "(e.g. LoRAs); ComfyUI keeps one set of weights per loaded checkpoint. "
                           "Bake one LoRA into a copy of the checkpoint, or apply LoRAs to different checkpoints.")
    return [v[0] for v in seen.values()]


def _check_same_prediction(patchers, names):
    kinds = [(type(p.model.model_sampling).__name__, str(getattr(p.model, "model_type", ""))) for p in patchers]
    for kind, name in zip(kinds[1:], names[1:]):
        if kind != kinds[0]:
            raise IncompatibleModelsError(
                f"'{name}' predicts {kind[1]} ({kind[0]}) but '{names[0]}' predicts {kinds[0][1]} "
                f"({kinds[0][0]}); AFA mixes predictions, so all models must share one prediction type.")

"""ComfyUI layer: turns N ModelPatchers into ONE MODEL that runs the AFA ensemble.

The result is a clone of expert 1 whose UNet forward is replaced by a DIFFUSION_MODEL
wrapper running `core.ensemble.EnsembleExecutor` over all experts. The other experts
and the aggregator are `additional_models` of that clone, so ComfyUI's memory manager
loads and offloads them together with it. Module references live in closures and
attachments (never in model_options, which clone() deep-copies).
"""
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension

from . import logger
from .comfy_flux import ComfyChromaExpert, ComfyFluxExpert, FluxControl
from .comfy_mmdit import ComfyMMDiTExpert, MMDiTControl, swapped_forward
from .comfy_qwen import ComfyQwenExpert, QwenControl, forward_arguments
from .comfy_unet import ComfyExpert, ComfyHooks, split_adm, split_per_model
from .core.aggregator_file import check_fits
from .core.ensemble import EnsembleExecutor, mixer_for
from .core.errors import AFAError, IncompatibleModelsError
from .core.layout import Layout, check_same_layout, derive_layout
from .core.spec import EnsembleSpec, Mode, StepContext

KEY = "afa"
# Activation memory ComfyUI reserves, relative to one model: the stacked N features and
# the aggregator's attention come on top of one UNet's activations.
MEMORY_FACTOR = 2.0
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Ensemble:
    """Everything resolved once per MODEL; attached to the patcher under "afa"."""
    names: list
    hashes: list                  # sha256 per expert, None where the file is unknown
    sources: Optional[list]       # checkpoint paths when known (training hashes them)
    models: list                  # BaseModel per expert (repeats allowed: same checkpoint twice)
    layout: Layout
    spec: EnsembleSpec            # checked
    mixer: object = None
    aggregator: Optional[torch.nn.Module] = None
    aggregator_patcher: object = None
    recorder: Optional[Callable] = None   # recorder(point, weights, ctx: StepContext)
    block_patches: Optional[list] = None  # DiTs: each expert's own patches_replace["dit"] when built

    @property
    def num_models(self):
        return len(self.models)

    @property
    def mode(self) -> Mode:
        return self.spec.mode


def get_ensemble(model) -> Optional[Ensemble]:
    return model.get_attachment(KEY) if hasattr(model, "get_attachment") else None


def require_ensemble(model, what="this node") -> Ensemble:
    ensemble = get_ensemble(model)
    if ensemble is None:
        raise AFAError(f"{what} needs an AFA MODEL (from AFA Ensemble Loader or AFA Ensemble); "
                       "the MODEL given is a plain model.")
    return ensemble


def step_context(transformer_options: dict, recorder=None) -> StepContext:
    """ComfyUI's per-call transformer_options -> the core's StepContext (the only place that reads them)."""
    sigmas = transformer_options.get("sigmas")
    sigma = None if sigmas is None else float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else float(sigmas)
    return StepContext(sigma=sigma, rows=tuple(transformer_options.get("cond_or_uncond") or (0,)),
                       schedule=transformer_options.get("sample_sigmas"), recorder=recorder)


def _diffusion_wrapper(ensemble: Ensemble, executor_core: EnsembleExecutor):
    def afa_diffusion_model(executor, x, timesteps, context=None, y=None, control=None,
                            transformer_options={}, *args, **kwargs):
        unets = [executor.class_obj] + [m.diffusion_model for m in ensemble.models[1:]]
        n = len(unets)
        contexts = split_per_model(context, n, ensemble.layout.context_dim, "the text context")
        ys = split_adm(y, n, ensemble.layout.adm_dim) if ensemble.layout.adm_dim else [y] * n
        unets, contexts, ys = _selected(ensemble, unets, contexts, ys)
        experts = [ComfyExpert(u, transformer_options, x, kwargs) for u in unets]
        ctx = step_context(transformer_options, ensemble.recorder)
        return executor_core(experts, x, timesteps, contexts, ys, ComfyHooks(control, transformer_options), ctx)
    return afa_diffusion_model


def _selected(ensemble: Ensemble, *per_model):
    """Mode SINGLE_MODEL runs one expert: keep its entry of every per-model list."""
    if ensemble.mode is not Mode.SINGLE_MODEL:
        return per_model
    k = ensemble.spec.single_index
    return tuple([values[k]] for values in per_model)


def _dit_block_patches(ensemble: Ensemble, transformer_options):
    """Each expert's block patches: expert 1 gets this call's (its own plus any put on the AFA
    MODEL later); the others their own, plus those put on the AFA MODEL after ensembling."""
    now = transformer_options.get("patches_replace", {}).get("dit", {})
    own = ensemble.block_patches or [{} for _ in ensemble.models]
    added = {key: patch for key, patch in now.items() if key not in own[0]}
    return [now] + [{**mine, **added} for mine in own[1:]]


def dit_experts(family: str, modules, x, timesteps, contexts, ys, guidance=None, ref_latents=None,
                transformer_options=None, kwargs=None, patches=None) -> list:
    """The family's expert adapters for one call, one per module with its own context, pooled
    vector y and block patches (sampling and training build them here)."""
    options = transformer_options if transformer_options is not None else {}
    patches = patches or [None] * len(modules)
    if family == "mmdit":
        return [ComfyMMDiTExpert(m, x, timesteps, c, y, options, p)
                for m, c, y, p in zip(modules, contexts, ys, patches)]
    if family == "qwen_image":   # kwargs: the rest of the model's _forward call by name (comfy_qwen)
        return [ComfyQwenExpert(m, x, timesteps, c, options, kwargs, p) for m, c, p in zip(modules, contexts, patches)]
    expert_class = ComfyChromaExpert if family == "chroma" else ComfyFluxExpert
    return [expert_class(m, x, timesteps, c, y, guidance, ref_latents, options, kwargs, p)
            for m, c, y, p in zip(modules, contexts, ys, patches)]


def _flux_experts(ensemble: Ensemble, module, x, timestep, context, y, guidance, ref_latents,
                  transformer_options, kwargs):
    layout, n = ensemble.layout, ensemble.num_models
    modules = [module] + [m.diffusion_model for m in ensemble.models[1:]]
    contexts = split_per_model(context, n, layout.context_dim, "the text context")
    ys = split_per_model(y, n, layout.vec_dim, "the pooled text vector") if layout.vec_dim else [y] * n
    modules, contexts, ys, patches = _selected(ensemble, modules, contexts, ys,
                                               _dit_block_patches(ensemble, transformer_options))
    return dit_experts(layout.family, modules, x, timestep, contexts, ys, guidance, ref_latents,
                       transformer_options, kwargs, patches), contexts


def _run_flux(ensemble: Ensemble, executor_core: EnsembleExecutor, executor, x, timestep, context, y, guidance,
              ref_latents, control, transformer_options, kwargs):
    """One FLUX-family call (FLUX and Chroma differ only in their forward's signature)."""
    experts, contexts = _flux_experts(ensemble, executor.class_obj, x, timestep, context, y, guidance,
                                      ref_latents, transformer_options, kwargs)
    return executor_core.forward(experts, {"contexts": contexts, "hooks": FluxControl(control)},
                                 step_context(transformer_options, ensemble.recorder))


def _flux_wrapper(ensemble: Ensemble, executor_core: EnsembleExecutor):
    def afa_flux(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):
        return _run_flux(ensemble, executor_core, executor, x, timestep, context, y, guidance, ref_latents,
                         control, transformer_options, kwargs)
    return afa_flux


def _chroma_wrapper(ensemble: Ensemble, executor_core: EnsembleExecutor):
    def afa_chroma(executor, x, timestep, context, guidance, control=None, transformer_options={}, **kwargs):
        return _run_flux(ensemble, executor_core, executor, x, timestep, context, None, guidance, None,
                         control, transformer_options, kwargs)
    return afa_chroma


def _mmdit_wrapper(ensemble: Ensemble, executor_core: EnsembleExecutor):
    """MMDiT.forward has no DIFFUSION_MODEL wrapper: enter at APPLY_MODEL and swap expert 1's
    forward for the duration of the call (ComfyUI's own input scaling and output stay)."""
    layout = ensemble.layout

    def afa_mmdit_apply(executor, *args, **kwargs):
        module = executor.class_obj.diffusion_model

        def forward(x, timesteps, context=None, y=None, control=None, transformer_options={}, **_):
            n = ensemble.num_models
            modules = [module] + [m.diffusion_model for m in ensemble.models[1:]]
            contexts = split_per_model(context, n, layout.context_dim, "the text context")
            ys = split_per_model(y, n, layout.adm_dim, "the pooled text vector") if layout.adm_dim else [y] * n
            modules, contexts, ys, patches = _selected(ensemble, modules, contexts, ys,
                                                       _dit_block_patches(ensemble, transformer_options))
            experts = dit_experts("mmdit", modules, x, timesteps, contexts, ys, transformer_options=transformer_options,
                                  patches=patches)
            return executor_core.forward(experts, {"contexts": contexts, "hooks": MMDiTControl(control)},
                                         step_context(transformer_options, ensemble.recorder))
        with swapped_forward(module, forward):
            return executor(*args, **kwargs)
    return afa_mmdit_apply


def _qwen_wrapper(ensemble: Ensemble, executor_core: EnsembleExecutor):
    """Qwen-Image: its `_forward`'s arguments by name (their order differs between ComfyUI versions)."""
    def afa_qwen(executor, x, timestep, context, *args, **kwargs):
        module = executor.class_obj
        call = forward_arguments(module, x, timestep, context, *args, **kwargs)
        options = call.get("transformer_options") or {}
        modules = [module] + [m.diffusion_model for m in ensemble.models[1:]]
        contexts = split_per_model(context, len(modules), ensemble.layout.context_dim, "the text context")
        modules, contexts, patches = _selected(ensemble, modules, contexts, _dit_block_patches(ensemble, options))
        experts = dit_experts("qwen_image", modules, x, timestep, contexts, [None] * len(modules),
                              transformer_options=options, kwargs=call, patches=patches)
        return executor_core.forward(experts, {"contexts": contexts, "hooks": QwenControl(call.get("control"))},
                                     step_context(options, ensemble.recorder))
    return afa_qwen


# family -> (the wrapper kind ComfyUI calls, the wrapper factory)
ENTRIES = {"unet": (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, _diffusion_wrapper),
           "flux": (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, _flux_wrapper),
           "chroma": (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, _chroma_wrapper),
           "mmdit": (comfy.patcher_extension.WrappersMP.APPLY_MODEL, _mmdit_wrapper),
           "qwen_image": (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, _qwen_wrapper)}


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
    ensemble.mixer = mixer_for(ensemble.spec, ensemble.layout, ensemble.num_models, ensemble.aggregator)
    executor_core = EnsembleExecutor(ensemble.layout, ensemble.mixer)
    entry, factory = ENTRIES[ensemble.layout.family]
    for kind in (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, comfy.patcher_extension.WrappersMP.APPLY_MODEL):
        patcher.remove_wrappers_with_key(kind, KEY)
    for kind, fn in ((entry, factory(ensemble, executor_core)),
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


def aggregator_patcher(aggregator_file, layout: Layout, dtype):
    """The aggregator as a ModelPatcher built from comfy.ops layers (low-VRAM streaming)."""
    module = aggregator_file.build(ops=comfy.ops.manual_cast, dtype=dtype)
    module.eval().requires_grad_(False)
    return module, comfy.model_patcher.ModelPatcher(
        module, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def build_ensemble(patchers, names, spec: Optional[EnsembleSpec] = None, aggregator_file=None, hashes=None,
                   sources=None):
    """N ModelPatchers -> one AFA MODEL (a clone of the first). `spec` says how they are combined
    (default: block-wise average; its checkpoints field is not read: the patchers are the models);
    `aggregator_file` is the loaded file for mode AGGREGATOR; `hashes` (sha256 per expert) and
    `sources` (paths) when known."""
    n = len(patchers)
    spec = spec or EnsembleSpec()
    spec = replace(spec, aggregator=spec.aggregator or (aggregator_file.path if aggregator_file else None)).checked(n)
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
    ensemble = Ensemble(names=list(names), hashes=hashes, sources=list(sources) if sources else None,
                        models=[p.model for p in patchers], layout=layout, spec=spec,
                        block_patches=[dict(p.model_options.get("transformer_options", {})
                                            .get("patches_replace", {}).get("dit", {})) for p in patchers])
    extra = [p for p in unique if p.model is not primary.model]
    if spec.mode is Mode.AGGREGATOR:
        if aggregator_file is None:
            raise AFAError("mode 'aggregator' needs an aggregator file: pick one from models/afa, "
                           f"or a training-free mode such as '{Mode.BLOCK_AVERAGE}'.")
        check_fits(aggregator_file, layout, names, hashes if all(hashes) else None)
        ensemble.aggregator, ensemble.aggregator_patcher = aggregator_patcher(
            aggregator_file, layout, aggregator_dtype(spec, compute_dtype(primary.model)))
        extra.append(ensemble.aggregator_patcher)
    primary.set_additional_models(KEY, [p.clone() if p.model is not primary.model else p for p in extra])
    install(primary, ensemble)
    logger.info("AFA ensemble of %d models (%s), mode '%s', %d aggregation points",
                n, ", ".join(names), spec.mode.value, len(layout.points))
    return primary


def compute_dtype(base_model) -> torch.dtype:
    """The dtype an expert computes in: ComfyUI's manual-cast dtype when it casts the stored
    weights (fp8 storage; fp16/bf16 storage on a device without fast fp16/bf16, e.g. the CPU),
    else the storage dtype."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


def aggregator_dtype(spec: EnsembleSpec, model_dtype) -> torch.dtype:
    """The aggregator computes in the spec's precision, else in the experts' compute dtype
    (`compute_dtype`; fp32 for a storage-only dtype such as fp8 that reaches it uncast).
    Its softmax is computed in fp32 whatever this is (core.sabw.SABWBlock)."""
    if spec.precision in PRECISION_DTYPES:
        return PRECISION_DTYPES[spec.precision]
    return model_dtype if model_dtype in PRECISION_DTYPES.values() else torch.float32


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

"""Nodes that build AFA ensembles (V3 schema): AFA Ensemble Loader, AFA Ensemble, AFA CLIP
Merge, AFA Load Aggregator. They validate, call service.models and shape the result.

Growing inputs: AFA Ensemble's MODELs and AFA CLIP Merge's CLIPs are one `io.Autogrow` input
on a ComfyUI that has it (v0.8.0: a new slot appears when the last one is connected). Its
slots are named "<group>.<slot>" in API prompts ("models.model_1", "clips.clip_3") and arrive
in `execute` as one dict {slot: value}. ComfyUI without Autogrow (v0.3.64) gets today's fixed
slots (model_1, model_2 required, model_3..model_6 optional), which arrive as keyword
arguments. `legacy_prompt_inputs` renames one style into the other, so prompts saved with
either keep working (see nodes.py). The loader keeps its six checkpoint dropdowns: an
Autogrow slot is always a socket (ComfyUI sets force_input on its template), never a
dropdown, and saved workflows store the loader's widget values by position.
"""
from comfy_api.v0_0_2 import io

from .core.errors import AFAError
from .core.spec import (FULL_RES_HELP, FULL_RES_NAMES, MAX_MODELS, MIN_MODELS, MODE_HELP, MODE_NAMES, WEIGHTS_HELP,
                        EnsembleSpec, FullRes, Mode)
from .service import models as service_models

CATEGORY = "AFA"
NONE = service_models.NONE
AUTOGROW = hasattr(io, "Autogrow")   # v0.8.0 has it; v0.3.64 does not (only an unfinished AutogrowDynamic)
Aggregator = io.Custom("AFA_AGGREGATOR")
SLOTS = range(1, MAX_MODELS + 1)
# node id -> (Autogrow input id, slot name prefix): the growing inputs of this module
GROWING = {"AFAEnsemble": ("models", "model_"), "AFACLIPMerge": ("clips", "clip_")}


def advanced(inp: io.Input) -> io.Input:
    """Shown under the node's 'advanced' toggle (ComfyUI's `advanced` input option)."""
    inp.extra_dict = dict(inp.extra_dict or {}, advanced=True)
    return inp


def growing_input(node_id: str, make, tooltip: str, slot_tooltip) -> list:
    """The 2-6 sockets of `node_id`'s growing input: one Autogrow (slots named prefix1..prefix6,
    the first two required; `tooltip` for every slot) or, without Autogrow, the same slots as
    fixed inputs (tooltip `slot_tooltip(i, optional)`). make(name, optional, tooltip) -> io.Input."""
    group, prefix = GROWING[node_id]
    names = [f"{prefix}{i}" for i in SLOTS]
    if AUTOGROW:
        template = io.Autogrow.TemplateNames(make(prefix.rstrip("_"), False, tooltip), names=names, min=MIN_MODELS)
        return [io.Autogrow.Input(group, template=template, tooltip=tooltip)]
    return [make(name, i > MIN_MODELS, slot_tooltip(i, i > MIN_MODELS)) for i, name in zip(SLOTS, names)]


def grown_values(node_id: str, group, slots: dict) -> list:
    """The connected values of a growing input in slot order, from the Autogrow dict `group`
    and/or fixed-slot keyword arguments `slots` (v0.3.64, or Python callers)."""
    _, prefix = GROWING[node_id]
    given = dict(group or {})
    given.update({k: v for k, v in slots.items() if k.startswith(prefix)})
    unknown = sorted(k for k in given if k.removeprefix(prefix) not in {str(i) for i in SLOTS})
    if unknown:
        raise AFAError(f"{node_id}: unknown input(s) {', '.join(unknown)}; the slots are {prefix}1 to {prefix}{MAX_MODELS}.")
    return [(k, given[k]) for k in sorted(given, key=lambda k: int(k.removeprefix(prefix))) if given[k] is not None]


def legacy_prompt_inputs(prompt: dict) -> int:
    """Rename growing-input slots of an API prompt in place to the style this ComfyUI declares
    ("model_3" <-> "models.model_3"); returns how many inputs were renamed."""
    renamed = 0
    for node in prompt.values():
        spec = GROWING.get(node.get("class_type")) if isinstance(node, dict) else None
        inputs = node.get("inputs") if spec else None
        if not isinstance(inputs, dict):
            continue
        group, prefix = spec
        for name in list(inputs):
            slot = name.removeprefix(group + ".")
            if not slot.startswith(prefix) or slot.removeprefix(prefix) not in {str(i) for i in SLOTS}:
                continue
            wanted = f"{group}.{slot}" if AUTOGROW else slot
            if name != wanted and wanted not in inputs:
                inputs[wanted] = inputs.pop(name)
                renamed += 1
    return renamed


def aggregator_choices():
    return [NONE] + service_models.aggregator_names()


def _ensemble_options() -> list:
    return [
        io.Combo.Input("mode", options=MODE_NAMES, default=Mode.AGGREGATOR.value, tooltip=MODE_HELP),
        io.String.Input("weights", default="", tooltip=WEIGHTS_HELP),
        io.Int.Input("model_index", default=1, min=1, max=MAX_MODELS,
                     tooltip=f"For '{Mode.SINGLE_MODEL.value}': which model runs (1 = the first)."),
    ]


def _map_refresh() -> io.Input:
    return advanced(io.Int.Input(
        "map_refresh", default=1, min=1, max=10, optional=True,
        tooltip=(f"For '{Mode.AGGREGATOR.value}': recompute the aggregator's maps every k steps "
                 "(1 = every step, the paper's method; 2 is ~5% faster on a CPU and measured "
                 "as good in BENCHMARKS.md; higher is faster and more approximate).")))


def _full_res() -> io.Input:
    return advanced(io.Combo.Input(
        "full_res", options=FULL_RES_NAMES, default=FullRes.EXACT.value, optional=True,
        tooltip=f"For '{Mode.AGGREGATOR.value}': {FULL_RES_HELP}"))


class AFAEnsembleLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        ckpts = service_models.checkpoint_names()
        return io.Schema(
            node_id="AFAEnsembleLoader", display_name="AFA Ensemble Loader", category=CATEGORY,
            description=("Loads 2-6 checkpoints of one architecture as ONE AFA ensemble MODEL for any sampler. "
                         "The CLIP encodes the prompt with every model's own text encoder."),
            inputs=[io.Combo.Input(f"ckpt_{i}", options=ckpts, tooltip=f"Checkpoint {i} of the ensemble.")
                    for i in (1, 2)]
                   + [io.Combo.Input("aggregator", options=aggregator_choices(),
                                     tooltip="Trained aggregator from models/afa, or none for a training-free mode.")]
                   + _ensemble_options()
                   + [io.Combo.Input(f"ckpt_{i}", options=[NONE] + ckpts, default=NONE, optional=True,
                                     tooltip=f"Optional checkpoint {i}.") for i in range(3, MAX_MODELS + 1)]
                   + [_map_refresh(), _full_res()],
            outputs=[io.Model.Output(tooltip="The AFA ensemble: use it like any MODEL."),
                     io.Clip.Output(tooltip="Encodes prompts with each model's own text encoder (use it for "
                                            "positive and negative)."),
                     io.Vae.Output(tooltip="The VAE of the first checkpoint.")])

    @classmethod
    def fingerprint_inputs(cls, aggregator, **kwargs):
        """Redo the load when a chosen file is overwritten (ComfyUI caches by inputs)."""
        ckpts = [kwargs.get(f"ckpt_{i}") for i in SLOTS]
        return service_models.files_fingerprint("checkpoints", ckpts) + "#" + service_models.files_fingerprint("afa", [aggregator])

    @classmethod
    def execute(cls, aggregator, mode, weights, model_index, map_refresh=1, full_res=FullRes.EXACT.value,
                **ckpts) -> io.NodeOutput:
        names = [ckpts[f"ckpt_{i}"] for i in SLOTS if ckpts.get(f"ckpt_{i}") not in (None, NONE)]
        if len(names) < MIN_MODELS:
            raise AFAError("AFA Ensemble Loader needs at least 2 checkpoints: choose ckpt_1 and ckpt_2.")
        spec = EnsembleSpec.from_ui(names, mode, aggregator, weights, model_index, map_refresh, full_res=full_res)
        loaded = service_models.load_ensemble(spec)
        return io.NodeOutput(loaded.model, loaded.clip, loaded.vae)


class AFAEnsemble(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AFAEnsemble", display_name="AFA Ensemble", category=CATEGORY,
            description=("Ensembles 2-6 MODELs (each may carry its own LoRA or patches) with AFA. "
                         "Encode prompts with 'AFA CLIP Merge' to give each model its own text encoding, "
                         "or with any single CLIP (shared by all models)."),
            inputs=growing_input("AFAEnsemble", lambda name, opt, tip: io.Model.Input(name, optional=opt, tooltip=tip),
                                 "A model of the ensemble (connect one to add the next slot; 2 to 6).",
                                 lambda i, opt: f"Optional model {i}." if opt else f"Model {i}.")
                   + _ensemble_options()
                   + [Aggregator.Input("aggregator", optional=True, tooltip=(
                       f"From AFA Load Aggregator; needed for mode '{Mode.AGGREGATOR.value}'.")),
                      _map_refresh(), _full_res()],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, mode, weights, model_index, map_refresh=1, aggregator=None, models=None,
                full_res=FullRes.EXACT.value, **slots) -> io.NodeOutput:
        given = grown_values("AFAEnsemble", models, slots)
        names = [k.replace("_", " ") for k, _ in given]  # a MODEL does not know its file
        spec = EnsembleSpec.from_ui((), mode, getattr(aggregator, "path", None), weights, model_index, map_refresh,
                                    full_res=full_res)
        return io.NodeOutput(service_models.ensemble_of_models([m for _, m in given], names, spec, aggregator))


class AFACLIPMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AFACLIPMerge", display_name="AFA CLIP Merge (per-model text)", category=CATEGORY,
            description=("Combines 2-6 CLIPs so a prompt is encoded by each model's own text encoder "
                         "(for AFA Ensemble)."),
            inputs=growing_input("AFACLIPMerge", lambda name, opt, tip: io.Clip.Input(name, optional=opt, tooltip=tip),
                                 "Text encoder of model N, in the order of AFA Ensemble's models.",
                                 lambda i, opt: f"Text encoder of model {i}."),
            outputs=[io.Clip.Output()])

    @classmethod
    def execute(cls, clips=None, **slots) -> io.NodeOutput:
        given = grown_values("AFACLIPMerge", clips, slots)
        if len(given) < MIN_MODELS:
            raise AFAError(f"AFA CLIP Merge needs {MIN_MODELS} to {MAX_MODELS} CLIPs, got {len(given)}: "
                           "connect each model's CLIP, in the order of AFA Ensemble's models.")
        return io.NodeOutput(service_models.merge_clips([c for _, c in given]))


class AFALoadAggregator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AFALoadAggregator", display_name="AFA Load Aggregator", category=CATEGORY,
            description="Loads a trained AFA aggregator from models/afa.",
            inputs=[io.Combo.Input("aggregator", options=service_models.aggregator_names(),
                                   tooltip="An aggregator .safetensors from models/afa.")],
            outputs=[Aggregator.Output()])

    @classmethod
    def fingerprint_inputs(cls, aggregator):
        return service_models.files_fingerprint("afa", [aggregator])

    @classmethod
    def execute(cls, aggregator) -> io.NodeOutput:
        return io.NodeOutput(service_models.load_aggregator_file(aggregator))


NODES = [AFAEnsembleLoader, AFAEnsemble, AFACLIPMerge, AFALoadAggregator]

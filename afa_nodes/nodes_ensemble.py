"""Nodes that build AFA ensembles: AFA Ensemble Loader, AFA Ensemble, AFA Load Aggregator."""
import os

import comfy.sd
import folder_paths

from .core.aggregator_file import file_sha256, load_aggregator
from .core.errors import AFAError
from .ensemble_model import MAX_MODELS, MODES, build_ensemble
from .per_model_clip import PerModelCLIP

CATEGORY = "AFA"
NONE = "none"
MODE_TOOLTIP = ("aggregator: the trained SABW aggregator mixes the models per pixel (needs an aggregator file). "
                "block-wise average: every block's outputs averaged (no training needed). "
                "noise average: each model runs alone, predictions averaged. "
                "fixed weights: your weights per model (see 'weights'). single model: only 'model index' runs.")
WEIGHTS_TOOLTIP = ("For 'fixed weights': one weight per model, e.g. '0.6, 0.4', or per block group: "
                   "'input: 1,0; middle: .5,.5; output: 0,1'. Normalised to sum 1.")


def register_afa_folder():
    """models/afa for aggregators, added to (never replacing) an entry from extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, "afa")
    paths, extensions = folder_paths.folder_names_and_paths.get("afa", ([], set()))
    if default not in paths:
        paths = list(paths) + [default]
    folder_paths.folder_names_and_paths["afa"] = (paths, {".safetensors"} | set(extensions or ()))


def aggregator_choices():
    return [NONE] + folder_paths.get_filename_list("afa")


def load_aggregator_by_name(name):
    if name in (None, "", NONE):
        return None
    return load_aggregator(folder_paths.get_full_path_or_raise("afa", name))


def files_fingerprint(folder, names):
    """name:size:mtime of each chosen file, so a result is redone when a file is overwritten
    (the nodes' IS_CHANGED: ComfyUI caches by inputs; the studio's model cache)."""
    out = []
    for name in names:
        if name and name != NONE:
            path = folder_paths.get_full_path(folder, name)
            if path and os.path.exists(path):
                st = os.stat(path)
                out.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(out)


def _ensemble_options():
    return {
        "mode": (MODES, {"default": "aggregator", "tooltip": MODE_TOOLTIP}),
        "weights": ("STRING", {"default": "", "tooltip": WEIGHTS_TOOLTIP}),
        "model_index": ("INT", {"default": 1, "min": 1, "max": MAX_MODELS,
                                "tooltip": "For 'single model': which model runs (1 = the first)."}),
    }


MAP_REFRESH = ("INT", {"default": 1, "min": 1, "max": 10, "advanced": True,
                       "tooltip": "For 'aggregator': recompute the aggregator's maps every k steps "
                                  "(1 = every step, the paper's method; 2 is ~5% faster on a CPU and measured "
                                  "as good in BENCHMARKS.md; higher is faster and more approximate)."})


class AFAEnsembleLoader:
    DESCRIPTION = ("Loads 2-6 checkpoints of one architecture as ONE AFA ensemble MODEL for any sampler. "
                   "The CLIP encodes the prompt with every model's own text encoder.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The AFA ensemble: use it like any MODEL.",
                       "Encodes prompts with each model's own text encoder (use it for positive and negative).",
                       "The VAE of the first checkpoint.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        ckpts = folder_paths.get_filename_list("checkpoints")
        required = {f"ckpt_{i}": (ckpts, {"tooltip": f"Checkpoint {i} of the ensemble."}) for i in (1, 2)}
        required["aggregator"] = (aggregator_choices(), {"tooltip": "Trained aggregator from models/afa, or none for a training-free mode."})
        required.update(_ensemble_options())
        optional = {f"ckpt_{i}": ([NONE] + ckpts, {"default": NONE, "tooltip": f"Optional checkpoint {i}."})
                    for i in range(3, MAX_MODELS + 1)}
        optional["map_refresh"] = MAP_REFRESH
        return {"required": required, "optional": optional}

    @classmethod
    def IS_CHANGED(cls, aggregator, **kwargs):
        ckpts = [kwargs.get(f"ckpt_{i}") for i in range(1, MAX_MODELS + 1)]
        return files_fingerprint("checkpoints", ckpts) + "#" + files_fingerprint("afa", [aggregator])

    def load(self, aggregator, mode, weights, model_index, map_refresh=1, **ckpts):
        names = [ckpts[f"ckpt_{i}"] for i in range(1, MAX_MODELS + 1) if ckpts.get(f"ckpt_{i}") not in (None, NONE)]
        if len(names) < 2:
            raise AFAError("AFA Ensemble Loader needs at least 2 checkpoints: choose ckpt_1 and ckpt_2.")
        agg_file = load_aggregator_by_name(aggregator) if mode == "aggregator" else None  # fail fast
        loaded = {}
        for name in names:  # the same checkpoint twice is loaded once
            if name not in loaded:
                path = folder_paths.get_full_path_or_raise("checkpoints", name)
                model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                    path, output_vae=True, output_clip=True,
                    embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
                if model is None:
                    raise AFAError(f"'{name}' holds no diffusion model (is it a VAE or text encoder file?).")
                loaded[name] = (model, clip, vae, path)
        hashes = [file_sha256(loaded[n][3]) for n in names] if agg_file is not None else None
        model = build_ensemble([loaded[n][0] for n in names], names, hashes, mode, agg_file, weights, model_index,
                               sources=[loaded[n][3] for n in names], refresh_every=map_refresh)
        clips = [loaded[n][1] for n in names]
        clip = PerModelCLIP.from_clips(clips) if all(c is not None for c in clips) else clips[0]
        return (model, clip, loaded[names[0]][2])


class AFAEnsemble:
    DESCRIPTION = ("Ensembles 2-6 MODELs (each may carry its own LoRA or patches) with AFA. "
                   "Encode prompts with 'AFA CLIP Merge' to give each model its own text encoding, "
                   "or with any single CLIP (shared by all models).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "ensemble"

    @classmethod
    def INPUT_TYPES(cls):
        required = {f"model_{i}": ("MODEL", {"tooltip": f"Model {i}."}) for i in (1, 2)}
        required.update(_ensemble_options())
        optional = {f"model_{i}": ("MODEL", {"tooltip": f"Optional model {i}."}) for i in range(3, MAX_MODELS + 1)}
        optional["aggregator"] = ("AFA_AGGREGATOR", {"tooltip": "From AFA Load Aggregator; needed for mode 'aggregator'."})
        optional["map_refresh"] = MAP_REFRESH
        return {"required": required, "optional": optional}

    def ensemble(self, mode, weights, model_index, map_refresh=1, aggregator=None, **models):
        keys = [f"model_{i}" for i in range(1, MAX_MODELS + 1) if models.get(f"model_{i}") is not None]
        patchers = [models[k] for k in keys]
        names = [k.replace("_", " ") for k in keys]  # a MODEL does not know its file
        return (build_ensemble(patchers, names, None, mode, aggregator, weights, model_index,
                               refresh_every=map_refresh),)


class AFACLIPMerge:
    DESCRIPTION = "Combines 2-6 CLIPs so a prompt is encoded by each model's own text encoder (for AFA Ensemble)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        required = {f"clip_{i}": ("CLIP", {"tooltip": f"Text encoder of model {i}."}) for i in (1, 2)}
        optional = {f"clip_{i}": ("CLIP", {"tooltip": f"Text encoder of model {i}."}) for i in range(3, MAX_MODELS + 1)}
        return {"required": required, "optional": optional}

    def merge(self, **clips):
        ordered = [clips[f"clip_{i}"] for i in range(1, MAX_MODELS + 1) if clips.get(f"clip_{i}") is not None]
        return (PerModelCLIP.from_clips(ordered),)


class AFALoadAggregator:
    DESCRIPTION = "Loads a trained AFA aggregator from models/afa."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AFA_AGGREGATOR",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"aggregator": (folder_paths.get_filename_list("afa"),
                                            {"tooltip": "An aggregator .safetensors from models/afa."})}}

    @classmethod
    def IS_CHANGED(cls, aggregator):
        return files_fingerprint("afa", [aggregator])

    def load(self, aggregator):
        return (load_aggregator_by_name(aggregator),)


NODE_CLASS_MAPPINGS = {
    "AFAEnsembleLoader": AFAEnsembleLoader,
    "AFAEnsemble": AFAEnsemble,
    "AFACLIPMerge": AFACLIPMerge,
    "AFALoadAggregator": AFALoadAggregator,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AFAEnsembleLoader": "AFA Ensemble Loader",
    "AFAEnsemble": "AFA Ensemble",
    "AFACLIPMerge": "AFA CLIP Merge (per-model text)",
    "AFALoadAggregator": "AFA Load Aggregator",
}

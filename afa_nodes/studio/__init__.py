"""AFA Studio: a gradio web UI over the pack's own code paths (`python -m afa_nodes studio`).

A thin front end: generation runs the AFA Ensemble Loader, ComfyUI's KSampler and
VAE Decode; training runs `training_host.train_from_comfy` like AFA Train Aggregator;
the maps come from `nodes_maps.record` and `core.map_render`. Checkpoints and
aggregators are listed by ComfyUI's `folder_paths` only (its model folders and
extra_model_paths.yaml). One generation or training job runs at a time per process
(`jobs.JobBoard`); gradio's queue orders the waiting requests.

Modules: `jobs` (the one-job rule; no gradio, no ComfyUI), `catalog` (what ComfyUI
offers), `generation`, `training`, `maps_view` (the back ends; no gradio), `state` (the
process-wide `Studio` every session shares), `app` (the gradio UI), `cli` (the `studio`
subcommand). Importing this package loads neither gradio nor ComfyUI, so
`python -m afa_nodes --help` works without them.
"""

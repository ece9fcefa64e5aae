"""AFA Studio: a gradio web UI over the pack's own code paths (`python -m afa_nodes studio`).

A thin front end over the service layer (afa_nodes/service), like the nodes and the CLI:
generation is `service.models.load_ensemble` + `service.sampling.sample` (ComfyUI's own
nodes); training is `service.training.train`; the maps come from `service.maps`. Checkpoints and
aggregators are listed by ComfyUI's `folder_paths` only (its model folders and
extra_model_paths.yaml). One generation or training job runs at a time per process
(`jobs.JobBoard`); gradio's queue orders the waiting requests.

Modules: `jobs` (the one-job rule; no gradio, no ComfyUI), `catalog` (what ComfyUI
offers), `generation`, `training`, `maps_view` (the back ends; no gradio), `state` (the
process-wide `Studio` every session shares), `app` (the gradio UI), `cli` (the `studio`
subcommand). Importing this package loads neither gradio nor ComfyUI, so
`python -m afa_nodes --help` works without them.
"""

"""TrainConfig, the one training configuration: its checks (host-free), and the node's inputs,
the CLI's flags and the studio's form generated from it (inside real ComfyUI)."""
import argparse

import pytest

from afa_nodes.core import train_config as tc
from afa_nodes.core.train_config import CLI, NODE, STUDIO, ConfigError, TrainConfig

# AFA Train Aggregator's widget inputs as shipped before TrainConfig generated them: name ->
# (type, default, min, max, step, optional). Saved workflows store widget values by position,
# so names, order and optional-ness must never change; defaults and ranges neither.
LEGACY_NODE = {
    "dataset_folder": ("STRING", "afa_dataset", None, None, None, False),
    "steps": ("INT", 1000, 1, 1_000_000, None, False),
    "batch_size": ("INT", 1, 1, 64, None, False),
    "learning_rate": ("FLOAT", 1e-4, 1e-7, 1e-1, 1e-5, False),
    "resolution": ("INT", 512, 64, 2048, 64, False),
    "seed": ("INT", 0, 0, 0xFFFFFFFF, None, False),
    "save_name": ("STRING", "afa_aggregator", None, None, None, False),
    "save_every": ("INT", 250, 0, 1_000_000, None, False),
    "resume": ("BOOLEAN", False, None, None, None, False),
    "gradient_checkpointing": ("BOOLEAN", True, None, None, None, False),
    "caption_dropout": ("FLOAT", 0.1, 0.0, 0.9, 0.05, False),
    "validation_fraction": ("FLOAT", 0.1, 0.0, 0.5, 0.05, False),
    "gradient_accumulation": ("INT", 1, 1, 256, None, True),
    "crop": ("COMBO", "center", None, None, None, True),
    "crop_variants": ("INT", 4, 1, 64, None, True),
    "buckets": ("BOOLEAN", False, None, None, None, True),
}
LEGACY_CLI = ["--data", "--out", "--steps", "--batch-size", "--grad-accum", "--lr", "--weight-decay", "--warmup",
              "--resolution", "--crop", "--crop-variants", "--buckets", "--seed", "--save-every", "--resume",
              "--grad-checkpointing", "--no-grad-checkpointing", "--val-fraction", "--caption-dropout",
              "--mixed-precision", "--cache-dir"]


def opt(f):
    return f.metadata["afa"]


# ------------------------------------------------------------------ host-free
def test_defaults_are_the_cli_ones_and_the_ui_ones_differ_only_where_documented():
    config = TrainConfig()
    assert (config.batch_size, config.save_every, config.gradient_checkpointing, config.lr) == (8, 500, None, 1e-4)
    ui = {f.name: opt(f).default_in(f, NODE) for f in tc.options(NODE)}
    differing = {f.name for f in tc.options() if opt(f).default_in(f, NODE) != f.default}
    assert differing == {"dataset", "out", "batch_size", "save_every", "gradient_checkpointing"}
    assert (ui["batch_size"], ui["save_every"], ui["gradient_checkpointing"]) == (1, 250, True)
    for name in ("batch_size", "save_every", "gradient_checkpointing"):
        assert name in tc.__doc__  # the module docstring says why


def test_every_field_has_its_metadata_and_node_inputs_keep_their_order():
    for f in tc.options():
        o = opt(f)
        assert o.help and o.section in ("data", "schedule", "optimiser", "memory", "validation", "output",
                                        "aggregator"), f.name
        assert o.fronts and o.fronts <= tc.ALL, f.name
        assert o.kind_of(f) in ("int", "float", "bool", "str", "path"), f.name
    node = tc.options(NODE)
    optional = [opt(f).node_optional for f in node]
    assert optional == sorted(optional)  # required inputs first: a new node input is appended as optional
    assert [opt(f).name_in(f, NODE) for f in node] == list(LEGACY_NODE)


@pytest.mark.parametrize("changes, field, words", [
    (dict(batch_size=0), "batch_size", "at least 1"),
    (dict(caption_dropout=1.0), "caption_dropout", "below 1.0"),
    (dict(lr=0.0), "lr", "above 0.0"),
    (dict(resolution=100), "resolution", "multiple of 8"),
    (dict(crop="left"), "crop", "one of center, random"),
    (dict(mixed_precision="fp8"), "mixed_precision", "one of auto, no, fp16, bf16"),
    (dict(steps=2.5), "steps", "whole number"),
    (dict(resume="yes"), "resume", "true or false"),
    (dict(hidden=96, heads=5), "heads", "divide the SABW width 96"),
])
def test_bad_values_raise_one_typed_error_naming_the_field_in_every_front_end(changes, field, words):
    with pytest.raises(ConfigError, match=words) as e:
        TrainConfig(**changes)
    assert e.value.field == field
    f = tc.spec(field)
    for front in opt(f).fronts:  # the message names the input/flag the user typed
        assert opt(f).name_in(f, front) in str(e.value)


def test_ui_values_are_converted_checked_against_the_widget_and_round_trip():
    config = tc.from_ui({"steps": "7", "learning_rate": 3e-6, "resume": "true", "crop": "random"}, STUDIO)
    assert (config.steps, config.lr, config.resume, config.crop, config.batch_size) == (7, 3e-6, True, "random", 1)
    assert tc.from_ui(tc.to_ui(config, STUDIO), STUDIO) == config
    with pytest.raises(ConfigError, match="between 1 and 64, got 65"):  # the node's range, not the CLI's
        tc.from_ui({"batch_size": 65}, NODE)
    assert TrainConfig(batch_size=65).batch_size == 65
    with pytest.raises(ConfigError, match="unknown training option.*warp_drive"):
        tc.from_ui({"warp_drive": 1}, STUDIO)
    with pytest.raises(ConfigError, match="unknown training option.*sabw_hidden"):  # not a node input
        tc.from_ui({"sabw_hidden": 64}, NODE)
    with pytest.raises(ConfigError, match="'out'.*is not set") as e:
        TrainConfig(dataset="d").for_run()
    assert e.value.field == "out"


# ------------------------------------------------------------------ the front ends, inside ComfyUI
@pytest.mark.comfyui
def test_node_inputs_are_generated_from_the_config_and_match_the_shipped_node(comfy_nodes):
    node = comfy_nodes["AFATrainAggregator"]
    spec = node.INPUT_TYPES()
    inputs = {**spec["required"], **spec.get("optional", {})}
    assert list(spec["required"])[:3] == ["model", "clip", "vae"]
    assert [n for n in inputs if n not in ("model", "clip", "vae")] == list(LEGACY_NODE)
    for f in tc.options(NODE):
        o = opt(f)
        name = o.name_in(f, NODE)
        kind, opts = inputs[name]
        if o.choices:  # V3 writes a combo as ("COMBO", {"options": [...]}), V1 as ([...], {})
            assert (kind if isinstance(kind, list) else opts["options"]) == list(o.choices) == ["center", "random"]
            kind = "COMBO"
        legacy = LEGACY_NODE[name]
        lo, hi = o.limits(NODE)
        assert (kind, opts.get("default"), opts.get("min"), opts.get("max"), opts.get("step")) == legacy[:5], name
        assert (opts.get("default"), opts.get("min"), opts.get("max")) == (o.default_in(f, NODE), lo, hi)
        assert opts["tooltip"] == o.help and (name in spec.get("optional", {})) == o.node_optional == legacy[5]
    assert inputs["learning_rate"][1]["round"] is False
    assert list(node.RETURN_NAMES) == ["aggregator", "loss_curve", "report"]
    assert list(node.RETURN_TYPES) == ["AFA_AGGREGATOR", "IMAGE", "STRING"] and node.OUTPUT_NODE


@pytest.mark.comfyui
def test_cli_flags_are_generated_from_the_config_and_parse_into_it(comfy):
    from afa_nodes.cli_train import add_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert set(LEGACY_CLI) <= flags  # every command line that worked still parses
    base = ["--checkpoint", "a", "--checkpoint", "b", "--data", "d", "--out", "o"]
    assert config_from_args(parser.parse_args(base)) == TrainConfig(dataset="d", out="o")
    for f in tc.options(CLI):  # each flag, given alone, sets its field and nothing else
        o, flag = opt(f), opt(f).name_in(f, CLI)
        value = {"int": 64 if o.max is None else min(o.max, 64), "float": 0.25, "bool": True, "path": "x/y",
                 "str": "a red picture"}.get(
            o.kind_of(f))
        value = o.choices[-1] if o.choices else value
        given = {"--data": "d", "--out": "o", flag: None if value is True else str(value)}
        args = base[:4] + [a for k, v in given.items() for a in ([k] if v is None else [k, v])]
        assert config_from_args(parser.parse_args(args)) == TrainConfig(dataset="d", out="o").replace(
            **{f.name: value}), flag
    with pytest.raises(SystemExit):  # a choice the config does not have
        parser.parse_args(base + ["--crop", "left"])
    with pytest.raises(ConfigError, match="--batch-size"):
        config_from_args(parser.parse_args(base + ["--batch-size", "0"]))
    assert {f.name for f in tc.options(CLI)} == {f.name for f in tc.options()}


@pytest.mark.comfyui
def test_studio_form_is_generated_from_the_config(comfy):
    from afa_nodes.studio.training import check_options, option_specs
    specs = option_specs()
    assert list(specs) == [opt(f).name_in(f, STUDIO) for f in tc.options(STUDIO)]
    node_names = [opt(f).name_in(f, NODE) for f in tc.options(NODE)]
    assert list(specs)[:len(node_names)] == node_names  # the studio shows what the node shows, and more
    for f in tc.options(STUDIO):
        kind, opts = specs[opt(f).name_in(f, STUDIO)]
        assert opts["default"] == opt(f).default_in(f, STUDIO) and opts["tooltip"] == opt(f).help
        assert (opts.get("min"), opts.get("max")) == opt(f).limits(STUDIO)
        assert opts.get("advanced", False) == opt(f).advanced
        assert kind == (list(opt(f).choices) if opt(f).choices else
                        {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN"}.get(opt(f).kind_of(f), "STRING"))
    assert [n for n in specs if not specs[n][1].get("advanced")] == [
        "dataset_folder", "steps", "batch_size", "learning_rate", "resolution", "save_name", "save_every", "resume",
        "sample_prompt"]
    options = check_options({"steps": 7.0, "sabw_hidden": "64", "sabw_heads": 4})
    assert (options["steps"], options["sabw_hidden"], options["save_every"]) == (7, 64, 250)
    assert "cache_dir" not in specs  # CLI only: the studio trains inside ComfyUI's folders


@pytest.mark.comfyui
def test_node_fingerprint_follows_the_dataset_files(comfy_nodes, comfy):
    """ComfyUI caches a node by its inputs: the node re-trains when a file of its dataset changes."""
    import os

    from toy_dataset import make_dataset
    node = comfy_nodes["AFATrainAggregator"]
    folder = make_dataset(comfy.input_dir / "afa_fingerprint_ds", n=2)
    before = node.fingerprint_inputs(dataset_folder="afa_fingerprint_ds", steps=3)
    assert before and before == node.fingerprint_inputs(dataset_folder="afa_fingerprint_ds", steps=3)
    os.utime(folder / "img_0.txt", ns=(1, 1))
    assert node.fingerprint_inputs(dataset_folder="afa_fingerprint_ds") != before
    assert node.fingerprint_inputs(dataset_folder="../elsewhere") == ""

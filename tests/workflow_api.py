"""UI (litegraph) workflows -> API prompts, checked against a server's /object_info.

A workflow saved by ComfyUI's "Save" (what artists drag and drop: ``nodes`` with
``widgets_values``, ``links`` as ``[id, from_node, from_slot, to_node, to_slot, type]``)
is turned into what POST /prompt takes: ``{"<id>": {"class_type", "inputs"}}``.

* Widget values are matched to the node's widget inputs in /object_info's
  ``input_order`` (required, then optional); hidden inputs and sockets (MODEL, CLIP,
  ... and ``forceInput`` ones) take no value.
* An INT named ``seed``/``noise_seed`` or declared ``control_after_generate`` is
  followed by the frontend's "control after generate" value (``fixed``,
  ``randomize``, ...), which is skipped (the API prompt has no such input).
* A widget converted to a socket (an entry in ``inputs`` with ``widget`` and a
  ``link``) takes its value from the link: another node's output, or the value of a
  ``PrimitiveNode`` (frontend-only), followed through ``Reroute`` nodes.
* Values after a node's own widgets (widgets added by frontend extensions) are
  ignored unless ``strict``.
* A growing input (V3 ``Autogrow``, type ``COMFY_AUTOGROW_V3``) is a row of sockets named
  ``<input>.<slot>`` (its template's ``names``; the first ``min`` required). A saved socket
  named in the other style (``model_3`` where the server has ``models.model_3``, or the
  reverse) is renamed as the pack's web extension (web/afa_slots.js) renames it when the
  frontend loads the file: connected ones keep their link, empty ones are dropped.
* ``Note``/``MarkdownNote``/``Reroute``/``PrimitiveNode`` are frontend-only and left
  out; muted nodes (mode 2) too; bypassed nodes (mode 4) are refused.

Every node type, input, link type and widget value (count, type, combo choice) is
checked against /object_info; problems raise :class:`WorkflowError` naming the
workflow, the node and the input.

Standard library only.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
AUTOGROW = "COMFY_AUTOGROW_V3"
MODE_MUTED, MODE_BYPASS = 2, 4
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
UPLOAD_VALUES = ("image", "video", "audio", None)


class WorkflowError(ValueError):
    """The workflow does not fit the server's nodes, or cannot be converted."""


def load_workflow(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    if not isinstance(wf, dict) or not isinstance(wf.get("nodes"), list) or "links" not in wf:
        raise WorkflowError(f"{Path(path).name}: not a UI-format workflow (needs 'nodes' and 'links').")
    return wf


# ------------------------------------------------------------------ /object_info helpers
def _spec_type(spec) -> Any:
    return spec[0] if isinstance(spec, (list, tuple)) and spec else spec


def _spec_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_choices(spec) -> list | None:
    t = _spec_type(spec)
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return list(_spec_options(spec).get("options") or [])
    return None


def is_widget(spec) -> bool:
    """Whether the frontend shows this input as a widget (with a value in widgets_values)."""
    if _spec_options(spec).get("forceInput"):
        return False
    t = _spec_type(spec)
    return isinstance(t, list) or t in WIDGET_TYPES


def has_control_after_generate(name: str, spec) -> bool:
    t = _spec_type(spec)
    opts = _spec_options(spec)
    if opts.get("control_after_generate"):
        return True
    return t == "INT" and name in SEED_NAMES


def autogrow_slots(name: str, spec) -> list[tuple[str, Any, str]]:
    """The sockets of a growing input: [("<name>.<slot>", template spec, section)]."""
    template = _spec_options(spec).get("template") or {}
    inner = template.get("input") or {}
    tspec = next(iter((inner.get("required") or inner.get("optional") or {}).values()), None)
    slots = template.get("names") or [f"{template.get('prefix', '')}{i}" for i in range(template.get("max", 0))]
    low = template.get("min", 1)
    return [(f"{name}.{slot}", tspec, "required" if i < low else "optional") for i, slot in enumerate(slots)]


def input_specs(node_info: dict) -> list[tuple[str, Any, str]]:
    """[(name, spec, section)] in the frontend's order (input_order when given); a growing
    input is expanded into its sockets."""
    out = []
    inputs = node_info.get("input") or {}
    order = node_info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            if name in specs:
                if _spec_type(specs[name]) == AUTOGROW:
                    out += autogrow_slots(name, specs[name])
                else:
                    out.append((name, specs[name], section))
    return out


def renamed_slot(name: str, by_name: dict) -> str | None:
    """The server's name for a saved socket named in the other growing-input style, else None."""
    grown = {n.split(".", 1)[1]: n for n in by_name if "." in n}
    if name in grown:
        return grown[name]                                   # model_3 -> models.model_3
    if "." in name and name.split(".", 1)[1] in by_name:
        return name.split(".", 1)[1]                         # models.model_3 -> model_3
    return None


def _types_compatible(out_type: str, in_type) -> bool:
    if isinstance(in_type, list):
        in_type = "COMBO"
    if out_type == "*" or in_type == "*" or out_type == in_type:
        return True
    a, b = set(str(out_type).split(",")), set(str(in_type).split(","))
    return bool(a & b)


# ------------------------------------------------------------------ conversion
class _Converter:
    def __init__(self, workflow: dict, object_info: dict, name: str, strict: bool = False):
        self.wf, self.info, self.name, self.strict = workflow, object_info, name, strict
        self.ignored: list = []
        self.nodes = {n["id"]: n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):  # some frontend versions
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                        link["target_slot"], link.get("type")]
            self.links[link[0]] = link
        if workflow.get("definitions", {}).get("subgraphs"):
            self.fail("uses subgraphs, which this converter does not support")

    def fail(self, msg: str, node: dict | None = None):
        where = f" node {node['id']} ({node.get('type')})" if node else ""
        raise WorkflowError(f"workflow {self.name}:{where}: {msg}")

    def node_info(self, node: dict) -> dict:
        t = node.get("type")
        if t not in self.info:
            self.fail(f"node type '{t}' is not registered by the server (missing custom node pack, "
                      "or the pack failed to import)", node)
        return self.info[t]

    def resolve_link(self, link_id, node: dict, input_name: str, depth: int = 0):
        """A link -> ["node_id", slot] of a real node, or ("value", v) from a PrimitiveNode."""
        if depth > 64:
            self.fail(f"input '{input_name}': Reroute chain too long (a loop?)", node)
        link = self.links.get(link_id)
        if link is None:
            self.fail(f"input '{input_name}' refers to link {link_id}, which is not in 'links'", node)
        _, from_id, from_slot, to_id, _to_slot, _type = link[:6]
        if to_id != node["id"]:
            self.fail(f"input '{input_name}': link {link_id} ends at node {to_id}, not here", node)
        src = self.nodes.get(from_id)
        if src is None:
            self.fail(f"input '{input_name}': link {link_id} comes from node {from_id}, which does not exist", node)
        if src.get("mode") == MODE_MUTED:
            self.fail(f"input '{input_name}' comes from muted node {from_id} ({src.get('type')})", node)
        if src.get("mode") == MODE_BYPASS:
            self.fail(f"input '{input_name}' comes from bypassed node {from_id} ({src.get('type')}); "
                      "bypass is not supported here", node)
        if src["type"] == "Reroute":
            inputs = src.get("inputs") or []
            if not inputs or inputs[0].get("link") is None:
                self.fail(f"input '{input_name}' comes from an unconnected Reroute ({from_id})", node)
            return self.resolve_link(inputs[0]["link"], src, input_name, depth + 1)
        if src["type"] == "PrimitiveNode":
            values = src.get("widgets_values") or []
            if not values:
                self.fail(f"input '{input_name}': PrimitiveNode {from_id} has no value", node)
            return ("value", values[0])
        if src["type"] in FRONTEND_ONLY:
            self.fail(f"input '{input_name}' comes from a {src['type']} node", node)
        out_info = self.node_info(src)
        outputs = out_info.get("output") or []
        if not 0 <= from_slot < len(outputs):
            self.fail(f"input '{input_name}': node {from_id} ({src['type']}) has no output slot {from_slot}", node)
        return [str(from_id), int(from_slot)], outputs[from_slot]

    def check_value(self, node: dict, name: str, spec, value):
        t = _spec_type(spec)
        choices = combo_choices(spec)
        if choices is not None:
            if value not in choices:
                self.fail(f"widget '{name}' = {value!r} is not one of the server's choices "
                          f"{choices[:12]}{' ...' if len(choices) > 12 else ''}", node)
        elif t == "INT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                self.fail(f"widget '{name}' = {value!r} is not an integer", node)
        elif t == "FLOAT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self.fail(f"widget '{name}' = {value!r} is not a number", node)
        elif t == "BOOLEAN":
            if not isinstance(value, bool):
                self.fail(f"widget '{name}' = {value!r} is not a boolean", node)
        elif t == "STRING" and not isinstance(value, str):
            self.fail(f"widget '{name}' = {value!r} is not a string", node)
        opts = _spec_options(spec)
        if t in ("INT", "FLOAT") and isinstance(value, (int, float)):
            lo, hi = opts.get("min"), opts.get("max")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                self.fail(f"widget '{name}' = {value!r} is outside [{lo}, {hi}]", node)

    def widget_values(self, node: dict, specs) -> dict:
        """{input name: value} from widgets_values, in widget order."""
        values = node.get("widgets_values")
        widgets = [(n, s) for n, s, _ in specs if is_widget(s)]
        optional = {n for n, s, section in specs if section == "optional" and "default" in _spec_options(s)}
        if values is None:
            values = []
        if isinstance(values, dict):  # some nodes serialize by name
            return {n: values[n] for n, _ in widgets if n in values}
        out, i = {}, 0
        for k, (name, spec) in enumerate(widgets):
            if i >= len(values) and {n for n, _ in widgets[k:]} <= optional:
                # a file saved before optional inputs were appended: the frontend gives them their defaults
                out.update((n, _spec_options(s)["default"]) for n, s in widgets[k:])
                break
            if i >= len(values):
                self.fail(f"widgets_values has {len(values)} value(s) but the node has more widgets "
                          f"(missing '{name}' and after; widgets: {[n for n, _ in widgets]})", node)
            out[name] = values[i]
            i += 1
            if has_control_after_generate(name, spec):
                if i < len(values) and values[i] in CONTROL_VALUES:
                    i += 1
                else:
                    self.fail(f"widget '{name}' must be followed by a 'control after generate' value "
                              f"({', '.join(CONTROL_VALUES)}), got "
                              f"{values[i] if i < len(values) else 'nothing'!r}", node)
            if any(_spec_options(spec).get(k) for k in UPLOAD_OPTIONS) and i < len(values) \
                    and values[i] in UPLOAD_VALUES:  # LoadImage's upload button serializes a value
                i += 1
        if i != len(values):
            # Frontend extensions may add widgets of their own (previews, viewers) after the
            # node's inputs; their values come last and are not API inputs.
            if self.strict:
                self.fail(f"widgets_values has {len(values)} values but the node's widgets take {i} "
                          f"(widgets: {[n for n, _ in widgets]}); extra: {values[i:]!r}", node)
            self.ignored.append((node["id"], node["type"], values[i:]))
        return out

    def convert_node(self, node: dict) -> dict:
        info = self.node_info(node)
        specs = input_specs(info)
        by_name = {n: (s, sec) for n, s, sec in specs}
        hidden = set((info.get("input") or {}).get("hidden") or {})
        inputs = {}
        widget_vals = self.widget_values(node, specs)
        linked = {}
        for slot in node.get("inputs") or []:
            name = slot.get("name")
            widget_name = (slot.get("widget") or {}).get("name")
            key = widget_name or name
            if key not in by_name and renamed_slot(key, by_name):
                if slot.get("link") is None:
                    continue                                 # an empty old-style slot: dropped
                key = renamed_slot(key, by_name)
            if key not in by_name:
                if key in hidden:
                    self.fail(f"input '{key}' is hidden on the server and cannot be connected", node)
                self.fail(f"input '{key}' does not exist on the server's {node['type']} "
                          f"(inputs: {list(by_name)})", node)
            if slot.get("link") is not None:
                linked[key] = slot["link"]
        for name, spec, section in specs:
            if name in linked:
                res = self.resolve_link(linked[name], node, name)
                if isinstance(res, tuple) and res[0] == "value":
                    self.check_value(node, name, spec, res[1])
                    inputs[name] = res[1]
                else:
                    ref, out_type = res
                    if not _types_compatible(out_type, _spec_type(spec)):
                        self.fail(f"input '{name}' ({_spec_type(spec) if not isinstance(_spec_type(spec), list) else 'COMBO'}) "
                                  f"is linked to an output of type {out_type}", node)
                    inputs[name] = ref
            elif name in widget_vals:
                self.check_value(node, name, spec, widget_vals[name])
                inputs[name] = widget_vals[name]
            elif section == "required" and not is_widget(spec) and "." not in name:
                self.fail(f"required input '{name}' ({_spec_type(spec)}) is not connected", node)
            elif section == "required" and "." in name:
                self.fail(f"required socket '{name}' of a growing input is not connected", node)
        return {"class_type": node["type"], "inputs": inputs,
                "_meta": {"title": node.get("title") or node["type"]}}

    def convert(self) -> dict:
        prompt = {}
        for node in sorted(self.wf["nodes"], key=lambda n: n["id"]):
            if node.get("type") in FRONTEND_ONLY:
                continue
            if node.get("mode") == MODE_MUTED:
                continue
            if node.get("mode") == MODE_BYPASS:
                self.fail("is bypassed; bypass is not supported by this converter", node)
            prompt[str(node["id"])] = self.convert_node(node)
        if not prompt:
            self.fail("has no executable nodes")
        if not any(self.info[p["class_type"]].get("output_node") for p in prompt.values()):
            self.fail("has no output node (SaveImage, PreviewImage, ...)")
        return prompt


def to_api(workflow: dict, object_info: dict, name: str = "workflow", strict: bool = False) -> dict:
    """The API prompt of a UI workflow (raises WorkflowError on anything the server lacks).

    Values after a node's last widget (added by frontend extensions, e.g. a preview widget)
    are ignored unless ``strict``."""
    return _Converter(workflow, object_info, name, strict).convert()


def extra_widget_values(workflow: dict, object_info: dict, name: str = "workflow") -> list:
    """[(node id, type, values)] of widget values after the nodes' own widgets (see to_api)."""
    conv = _Converter(workflow, object_info, name)
    conv.convert()
    return conv.ignored


def check_workflow(workflow: dict, object_info: dict, name: str = "workflow") -> list[str]:
    """Every problem conversion would raise, as messages ([] when the workflow fits)."""
    try:
        to_api(workflow, object_info, name)
    except WorkflowError as e:
        return [str(e)]
    return []


def node_types(workflow: dict) -> set[str]:
    return {n["type"] for n in workflow["nodes"] if n.get("type") not in FRONTEND_ONLY}


def set_inputs(prompt: dict, class_type: str, **values) -> int:
    """Set literal inputs on every node of `class_type` that has them; returns how many were set."""
    count = 0
    for node in prompt.values():
        if node["class_type"] == class_type:
            for k, v in values.items():
                if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                    node["inputs"][k] = v
                    count += 1
    return count


def nodes_of(prompt: dict, class_type: str) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in prompt.items() if v["class_type"] == class_type]


def iter_workflows(folder: str | Path) -> Iterable[Path]:
    return sorted(Path(folder).glob("*.json"))

"""What a saved workflow relies on in a node's /object_info entry, comparable across ComfyUI
versions and node styles (V1 INPUT_TYPES, V3 schema): names, types, defaults, ranges,
tooltips, widget order, outputs. Used to check the V3 nodes against the V1 nodes' contract
(tests/fixtures/object_info_v1.json, recorded from the V1 nodes at commit cc712d1).

File lists (checkpoints, aggregators) depend on the machine and are left out; growing
inputs (Autogrow) are described by their slots. Standard library only."""
from __future__ import annotations

FILE_COMBOS = {"ckpt_1", "ckpt_2", "ckpt_3", "ckpt_4", "ckpt_5", "ckpt_6", "aggregator"}
KEYS = ("default", "min", "max", "step", "tooltip", "advanced", "forceInput")
AUTOGROW = "COMFY_AUTOGROW_V3"


def _input(name: str, spec, section: str) -> dict:
    t, opts = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    out = {"name": name, "section": section}
    if isinstance(t, list):                      # V1 combo: the choices are the type
        t, opts = "COMBO", dict(opts, options=t)
    out["type"] = t
    if t == AUTOGROW:
        template = opts.get("template") or {}
        inner = template.get("input") or {}
        tname, tspec = next(iter({**inner.get("required", {}), **inner.get("optional", {})}.items()))
        out.update(slots=list(template.get("names") or []), min=template.get("min"),
                   slot=_input(tname, tspec, "required"), tooltip=opts.get("tooltip"))
        return out
    if t == "COMBO" and name not in FILE_COMBOS:
        out["options"] = list(opts.get("options") or [])
    out.update({k: opts[k] for k in KEYS if k in opts})
    return out


def contract(info: dict) -> dict:
    """The comparable contract of one /object_info node entry."""
    inputs, order = info.get("input") or {}, info.get("input_order") or {}
    listed = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            listed.append(_input(name, specs[name], section))
    n = len(info.get("output") or [])
    return {
        "display_name": info.get("display_name"), "category": info.get("category"),
        "description": info.get("description"), "output_node": bool(info.get("output_node")),
        "output": list(info.get("output") or []), "output_name": list(info.get("output_name") or []),
        "output_tooltips": list(info.get("output_tooltips") or [None] * n),
        "inputs": listed,
        "widgets": [i["name"] for i in listed if is_widget(i)],
    }


def is_widget(i: dict) -> bool:
    return not i.get("forceInput") and i["type"] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def as_fixed_slots(c: dict, slot_tooltip: bool = True) -> dict:
    """The contract with each growing input written as the fixed slots it replaces, in the
    V1 nodes' layout: the required slots (below `min`) where the growing input is, the
    optional ones first among the optional inputs. slot_tooltip=False leaves the slots'
    tooltips out (an Autogrow has one tooltip for all its slots)."""
    required, optional, grown = [], [], []
    for i in c["inputs"]:
        if i["type"] != AUTOGROW:
            (required if i["section"] == "required" else optional).append(i)
            continue
        for k, slot in enumerate(i["slots"]):
            s = dict(i["slot"], name=slot, section="required" if k < i["min"] else "optional")
            (required if k < i["min"] else grown).append(s)
    inputs = required + grown + optional
    if not slot_tooltip:
        inputs = [dict(i, tooltip=None) if i["type"] in ("MODEL", "CLIP") else i for i in inputs]
    return dict(c, inputs=inputs)

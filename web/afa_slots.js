// ComfyUI-AFA: workflows saved with the other naming of a growing input load cleanly.
// AFA Ensemble's MODELs and AFA CLIP Merge's CLIPs are one growing input (ComfyUI's
// Autogrow, slots named "models.model_3") where ComfyUI has it, fixed slots ("model_3")
// where it does not. The frontend keeps a saved input whose name the node no longer has as
// an extra socket, so a workflow saved before the change would show its links on old-named
// sockets next to the new ones. Before such a node is configured, each saved slot gets the
// name this server declares (connected ones keep their link; empty old slots are dropped,
// the growing input makes its own). The server accepts both names in prompts as well
// (afa_nodes/nodes.py), so this is about how the node looks, not whether it runs.
import { app } from "../../scripts/app.js";

const AUTOGROW = "COMFY_AUTOGROW_V3";

// {slot name: "group.slot"} of the Autogrow inputs of a node definition, and its plain inputs.
function slotNames(nodeData) {
  const grown = {};
  const plain = new Set();
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData?.input?.[section] ?? {})) {
      if (spec?.[0] === AUTOGROW) {
        for (const slot of spec[1]?.template?.names ?? []) grown[slot] = `${name}.${slot}`;
      } else {
        plain.add(name);
      }
    }
  }
  return { grown, plain };
}

// The saved inputs renamed to this server's slot names (links kept, empty legacy slots dropped).
export function renameSavedSlots(inputs, nodeData) {
  const { grown, plain } = slotNames(nodeData);
  const out = [];
  for (const input of inputs) {
    const name = input?.name ?? "";
    const dot = name.indexOf(".");
    let wanted = null;
    if (grown[name]) wanted = grown[name];                                    // "model_3" -> "models.model_3"
    else if (dot > 0 && plain.has(name.slice(dot + 1))) wanted = name.slice(dot + 1);  // and back
    if (wanted === null || wanted === name) { out.push(input); continue; }
    if (input.link == null) continue;
    const shown = wanted.slice(wanted.indexOf(".") + 1);
    out.push({ ...input, name: wanted, localized_name: shown, label: shown });
  }
  return out;
}

app.registerExtension({
  name: "ComfyUI-AFA.slots",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.category !== "AFA") return;
    const { grown, plain } = slotNames(nodeData);
    if (!Object.keys(grown).length && ![...plain].some((n) => /_\d+$/.test(n))) return;
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info) {
      if (Array.isArray(info?.inputs)) info = { ...info, inputs: renameSavedSlots(info.inputs, nodeData) };
      return configure.call(this, info);
    };
  },
});

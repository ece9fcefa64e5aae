"""The validation table of an aggregator training run as text (core.train writes the table)."""
from __future__ import annotations

from typing import Optional

FINAL_LOSS_WINDOW = 20   # "final train loss" = mean of the last steps' losses


def format_validation(table: Optional[dict], meta: Optional[dict] = None) -> str:
    """The validation table as text (lower is better)."""
    meta = meta or {}
    head = f"AFA aggregator training: step {meta.get('step', '?')}/{meta.get('steps', '?')}"
    if meta.get("final_train_loss") is not None:
        head += f", train loss {meta['final_train_loss']:.5f} (mean of the last {FINAL_LOSS_WINDOW} steps)"
    if not table:
        return head + "\nNo validation set (validation fraction 0 or fewer than 2 images)."
    lines = [head, f"Validation at step {table['step']}: {table['samples']} held-out sample(s), "
                   f"{table['metric']} (lower is better)"]
    width = max(len(r["name"]) for r in table["rows"])
    best = min(r["loss"] for r in table["rows"])
    for r in table["rows"]:
        lines.append(f"  {r['name']:<{width}}  {r['loss']:.5f}{'  <- best' if r['loss'] == best else ''}")
    return "\n".join(lines)

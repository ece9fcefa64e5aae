"""Smoke test of benchmarks/quality.py --quick: every variant is reported with finite numbers."""
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.comfyui
@pytest.mark.slow
def test_quality_quick(comfy, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    png, md = tmp_path / "quality.png", tmp_path / "BENCHMARKS.md"
    result = quality.main(["--quick", "--png", str(png), "--md", str(md)])

    table = result["table"]
    for key, label in quality.VARIANTS:
        lines = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
        assert len(lines) == 1, f"{label} missing from the table:\n{table}"
        numbers = [float(x) for x in lines[0].replace("±", "|").replace("**(best)**", "").split("|")[2:-1]]
        assert len(numbers) == 5 and all(math.isfinite(x) for x in numbers), lines[0]
    assert {r["key"] for r in result["rows"]} == {k for k, _ in quality.VARIANTS}
    assert all(math.isfinite(r["mean"]) and math.isfinite(r["std"]) for r in result["rows"])
    assert png.stat().st_size > 0
    text = md.read_text(encoding="utf-8")
    assert text.count(quality.SECTION) == 1 and table in text

    quality.write_section(md, "replaced")  # re-running replaces our own section, keeps the rest
    text = md.read_text(encoding="utf-8")
    assert text.count(quality.SECTION) == 1 and "replaced" in text and table not in text

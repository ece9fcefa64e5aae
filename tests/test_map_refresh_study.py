"""Smoke test of benchmarks/map_refresh_study.py --quick: every policy is reported, the exact
policy is the reference (distance 0), the re-using ones really re-used maps, and each policy
computes its maps on the steps it says."""
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import map_refresh_study
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return map_refresh_study


def test_policies_compute_maps_where_they_say(study):
    by = {p.key: p for p in study.POLICIES}
    fresh = {key: [i for i in range(20) if by[key].mixer(None, 20).fresh(i)] for key in by}
    assert fresh["k1"] == list(range(20))
    assert fresh["k2"] == list(range(0, 20, 2)) and fresh["k4"] == [0, 4, 8, 12, 16]
    assert fresh["once"] == [0]
    assert fresh["early25_k4"] == [0, 1, 2, 3, 4, 8, 12, 16]        # exact steps 0-4, then every 4th after step 4
    assert fresh["late25_k4"] == [0, 4, 8, 12, 15, 16, 17, 18, 19]  # every 4th, exact from step 15
    assert all(by[key].fresh_steps(20) == len(steps) for key, steps in fresh.items())


@pytest.mark.comfyui
@pytest.mark.slow
def test_study_quick(comfy, study):
    result = study.main(["--quick"])
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {p.key for p in study.POLICIES} | {"block_avg"}
    samplers = [s for s, _ in study.SAMPLERS]
    for r in rows.values():
        values = [r["eps"][0], r["deps"][0]] + [r[f"{m}_{s}"][0] for m in ("dist", "share") for s in samplers]
        assert all(math.isfinite(v) for v in values), r
    exact = rows["k1"]
    assert exact["deps"] == (0.0, 0.0) and all(exact[f"dist_{s}"] == (0.0, 0.0) for s in samplers)
    for key in ("k2", "once", "block_avg"):   # maps re-used (or none): the run differs from the exact one
        assert all(rows[key][f"dist_{s}"][0] > 0 for s in samplers), key
    assert all(rows["block_avg"][f"share_{s}"][0] == pytest.approx(1.0) for s in samplers)
    assert result["fresh"] > 0 and result["reused"] > 0
    assert rows["k1"]["ratio"] == pytest.approx(result["fresh"])
    for line in [p.label for p in study.POLICIES]:
        assert f"| {line} |" in result["table"]

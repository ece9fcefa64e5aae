"""Which aggregation points and sampler steps a map recording keeps (host-free).

  points  "all", "1, 24", "0-11", names ("middle", "final", "input 3", "output 10", "double 2") or
          stages ("input" = every input point, "output" = every output point + final; DiTs:
          "double", "single", "joint"); "middle" of a family without a middle block is its
          middle point
  steps   "all", "every K" (0, K, 2K, ... and the last), "last K", or indices "0, 5, 10-12"

Both are parsed before sampling; a spec that names nothing that exists is an AFAError that
lists what does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from afa_nodes.core.errors import AFAError


def parse_points(spec: str, point_names: list[str]) -> list[int]:
    """Point indices (sorted, unique) for a spec such as "all", "1, 24", "0-11", "middle",
    "input 3", "output". AFAError names the valid points when one does not exist."""
    n = len(point_names)
    lookup = {_norm(name): i for i, name in enumerate(point_names)}
    lookup.setdefault("middle", n // 2)  # a family without a middle block (DiTs): the middle point
    stages = {}  # the first word of the point names: input/output (UNet), double/single (FLUX), joint (SD3)
    for i, name in enumerate(point_names):
        if " " in name:
            stages.setdefault(name.split(" ")[0], []).append(i)
    stages.get("output", []).extend(i for i, p in enumerate(point_names) if p == "final")
    chosen: set[int] = set()
    for token in re.split(r"[,;]", spec or ""):
        t = _norm(token)
        if not t:
            continue
        if t == "all":
            chosen.update(range(n))
        elif t in lookup:
            chosen.add(lookup[t])
        elif t in stages:
            chosen.update(stages[t])
        elif re.fullmatch(r"\d+", t):
            chosen.add(_check_index(int(t), point_names))
        elif re.fullmatch(r"\d+-\d+", t):
            a, b = (int(v) for v in t.split("-"))
            if a > b:
                raise AFAError(f"point range '{token.strip()}' runs backwards; write it as {b}-{a}.")
            chosen.update(_check_index(i, point_names) for i in range(a, b + 1))
        else:
            raise AFAError(f"unknown aggregation point '{token.strip()}'. {describe_points(point_names)}")
    if not chosen:
        raise AFAError(f"no aggregation point chosen (got '{spec}'). {describe_points(point_names)}")
    return sorted(chosen)


def _norm(text: str) -> str:
    t = re.sub(r"[\s_]+", " ", text.strip().lower())
    return re.sub(r"^([a-z]+)\s*(\d+)$", r"\1 \2", t)


def _check_index(i: int, point_names: list[str]) -> int:
    if not 0 <= i < len(point_names):
        raise AFAError(f"aggregation point {i} does not exist. {describe_points(point_names)}")
    return i


def describe_points(point_names: list[str]) -> str:
    """'This model has 25 aggregation points, 0-24: input 0-11 = 0-11, middle = 12, ...'"""
    parts, i = [], 0
    while i < len(point_names):
        stage = point_names[i].split(" ")[0]
        j = i
        while j + 1 < len(point_names) and point_names[j + 1].split(" ")[0] == stage and " " in point_names[j + 1]:
            j += 1
        if j > i:
            parts.append(f"{stage} {point_names[i].split(' ')[1]}-{point_names[j].split(' ')[1]} = {i}-{j}")
        else:
            parts.append(f"{point_names[i]} = {i}")
        i = j + 1
    return (f"This model has {len(point_names)} aggregation points, 0-{len(point_names) - 1}: "
            + ", ".join(parts) + "; or 'all', 'input', 'output'.")


@dataclass(frozen=True)
class StepSelection:
    """Which sampler steps to record: kind "all" | "every" | "last" | "list"."""
    kind: str = "all"
    k: int = 0
    indices: frozenset = frozenset()
    text: str = "all"

    @classmethod
    def parse(cls, spec: str) -> StepSelection:
        t = re.sub(r"\s+", " ", (spec or "all").strip().lower())
        if t in ("", "all"):
            return cls()
        m = re.fullmatch(r"(every|last) (\d+)", t)
        if m:
            k = int(m.group(2))
            if k < 1:
                raise AFAError(f"steps '{spec}': K must be at least 1.")
            return cls(m.group(1), k, text=t)
        indices = set()
        for token in t.split(","):
            token = token.strip()
            if re.fullmatch(r"\d+", token):
                indices.add(int(token))
            elif re.fullmatch(r"\d+ ?- ?\d+", token):
                a, b = (int(v) for v in token.split("-"))
                indices.update(range(min(a, b), max(a, b) + 1))
            elif token:
                raise AFAError(f"cannot read steps '{spec}': use 'all', 'every K', 'last K' or step "
                               "indices such as '0, 5, 10-12' (0 = the first step).")
        if not indices:
            raise AFAError(f"no steps chosen (got '{spec}').")
        return cls("list", indices=frozenset(indices), text=t)

    def wants(self, step: int, total: int | None) -> bool:
        """total: the run's number of steps, None when unknown ("last K" is then pruned at the end)."""
        if self.kind == "every":
            return step % self.k == 0 or (total is not None and step == total - 1)
        if self.kind == "last":
            return total is None or step >= total - self.k
        if self.kind == "list":
            return step in self.indices
        return True

    def missing(self, total: int) -> list[int]:
        """Chosen step indices that a run of `total` steps does not have."""
        return sorted(i for i in self.indices if i >= total) if self.kind == "list" else []

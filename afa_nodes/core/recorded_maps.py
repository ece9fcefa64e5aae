"""The weight maps of one sampling run, as the recorder keeps them and the renderer reads them
(host-free)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from afa_nodes.core.errors import AFAError


@dataclass
class RecordedMaps:
    """Per-step softmax weight maps of one sampling run.

    maps[(step, point_name, "cond"|"uncond")] = Tensor [B, N, h, w] float16 (reduced res).
    sigmas, if given, is parallel to `steps`.
    """
    model_names: list[str]
    point_names: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    sigmas: list[float] | None = None
    maps: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.model_names)

    @property
    def branches(self) -> list[str]:
        return sorted({k[2] for k in self.maps})

    def add(self, step: int, point: str, branch: str, weights: torch.Tensor,
            sigma: float | None = None, max_side: int = 64) -> None:
        """Store A [B, N, H, W] (area-pooled so the longest side is <= max_side)."""
        if weights.dim() != 4 or weights.shape[1] != self.n_models:
            raise AFAError(f"map for {point!r} has shape {tuple(weights.shape)}, expected "
                           f"[B, {self.n_models}, H, W] for models {self.model_names}")
        a = weights.detach().float()
        h, w = a.shape[-2:]
        if max(h, w) > max_side:
            s = max_side / max(h, w)
            a = F.adaptive_avg_pool2d(a, (max(1, round(h * s)), max(1, round(w * s))))
        if step not in self.steps:
            self.steps.append(step)
            if sigma is not None:
                self.sigmas = (self.sigmas or []) + [float(sigma)]
        if point not in self.point_names:
            self.point_names.append(point)
        self.maps[(step, point, branch)] = a.to("cpu", torch.float16)

    def weights(self, step: int, point: str, branch: str = "cond",
                batch_index: int = 0) -> torch.Tensor:
        """Tensor [N, h, w] float32 of one recorded map; AFAError lists what exists."""
        if point not in self.point_names:
            raise AFAError(f"aggregation point {point!r} was not recorded; "
                           f"available points: {', '.join(self.point_names) or 'none'}")
        if step not in self.steps:
            raise AFAError(f"step {step} was not recorded; available steps: "
                           f"{', '.join(map(str, self.steps)) or 'none'}")
        key = (step, point, branch)
        if key not in self.maps:
            have = sorted({k[2] for k in self.maps if k[:2] == (step, point)})
            raise AFAError(f"no {branch!r} map for point {point!r} at step {step}; "
                           f"branches recorded there: {', '.join(have) or 'none'} "
                           f"(recorded branches overall: {', '.join(self.branches) or 'none'})")
        a = self.maps[key]
        if not -a.shape[0] <= batch_index < a.shape[0]:
            raise AFAError(f"batch_index {batch_index} out of range: the map for {point!r} "
                           f"at step {step} holds {a.shape[0]} image(s) (0..{a.shape[0] - 1})")
        return a[batch_index].float()

    def sigma(self, step: int) -> float | None:
        if self.sigmas and len(self.sigmas) == len(self.steps) and step in self.steps:
            return self.sigmas[self.steps.index(step)]
        return None

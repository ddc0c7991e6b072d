"""A group's denoising chains: everything needed to re-score them, and their bytes for the store.

``Policy.sample`` records a ``Trajectory`` per group: the latents at every step, the timesteps,
each step's log-probability and the prompt embeddings. GRPO re-scores it under new weights; DPO
takes its final latents. The control room keeps it as one blob: safetensors for the tensors (never
a pickle) with the prompt, seeds and settings as its JSON metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load, save


@dataclass
class SamplingSettings:
    steps: int = 20
    guidance: float = 5.0
    eta: float = 1.0

    def check(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be at least 1.0 (1.0 = no guidance), got {self.guidance}")
        if not 0.0 < self.eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1], got {self.eta}: log-probabilities need a stochastic step")


@dataclass
class Trajectory:
    """The denoising chains of one group of candidates, everything needed to re-score them."""

    prompt: str
    seeds: list[int]
    settings: SamplingSettings
    timesteps: torch.Tensor  # (T,) int
    latents: torch.Tensor  # (n, T + 1, C, h, w): x_T ... x_0
    log_probs: torch.Tensor  # (n, T): log-prob of latents[:, j + 1] given latents[:, j]
    prompt_embeds: torch.Tensor  # (1, L, D)
    negative_embeds: torch.Tensor  # (1, L, D), the empty prompt's

    def select(self, indices: list[int]) -> "Trajectory":
        """The chains of some candidates only, in the given order (the survivors of a group)."""
        rows = torch.tensor(indices, dtype=torch.long)
        return Trajectory(
            self.prompt, [self.seeds[i] for i in indices], self.settings, self.timesteps,
            self.latents[rows], self.log_probs[rows], self.prompt_embeds, self.negative_embeds,
        )

    @staticmethod
    def join(parts: list["Trajectory"]) -> "Trajectory":
        """One group from several draws of the same prompt and settings (rejection sampling draws in batches)."""
        first = parts[0]
        for part in parts[1:]:
            if part.prompt != first.prompt or part.settings != first.settings or not torch.equal(part.timesteps, first.timesteps):
                raise ValueError("trajectories of different prompts or sampling settings cannot form one group")
        return Trajectory(
            first.prompt, [s for part in parts for s in part.seeds], first.settings, first.timesteps,
            torch.cat([part.latents for part in parts]), torch.cat([part.log_probs for part in parts]),
            first.prompt_embeds, first.negative_embeds,
        )

    def to_bytes(self) -> bytes:
        """Safetensors bytes: the tensors, with the prompt, seeds and settings as metadata."""
        tensors = {"timesteps": self.timesteps, "latents": self.latents, "log_probs": self.log_probs,
                   "prompt_embeds": self.prompt_embeds, "negative_embeds": self.negative_embeds}
        about = {"prompt": self.prompt, "seeds": self.seeds, "settings": asdict(self.settings)}
        return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"trajectory": json.dumps(about)})

    @staticmethod
    def from_bytes(data: bytes) -> "Trajectory":
        tensors = load(data)
        about = json.loads(_metadata(data)["trajectory"])
        return Trajectory(about["prompt"], about["seeds"], SamplingSettings(**about["settings"]), tensors["timesteps"],
                          tensors["latents"], tensors["log_probs"], tensors["prompt_embeds"], tensors["negative_embeds"])


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes: an 8-byte little-endian length, then a JSON header."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})

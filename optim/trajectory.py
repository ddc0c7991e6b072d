"""A group's denoising chains: everything needed to re-score them, and their bytes for the store.

``Policy.sample`` records a ``Trajectory`` per group: the latents at every step, the timesteps,
each step's log-probability and the prompt embeddings. GRPO re-scores it under new weights; DPO
takes its final latents. The control room keeps it as one blob: safetensors for the tensors (never
a pickle) with the prompt, seeds and settings as its JSON metadata.

What every family records is the same (latents, timesteps, log-probs, the prompt's and the empty
prompt's embeddings); what some add is optional: pooled embeddings (SDXL, SD 3, FLUX), the sigmas and
noise level of a flow-matching chain, and the steps that were deterministic (``fixed_steps``: a zero
std, no log-probability, never trained). ``Condition`` is what a denoiser is conditioned on, batch first:
the DPO pairs carry one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

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
        if not self.guidance >= 1.0:  # a NaN is refused too (every comparison with it is false)
            raise ValueError(f"guidance must be at least 1.0 (1.0 = no guidance), got {self.guidance}")
        if not 0.0 < self.eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1], got {self.eta}: log-probabilities need a stochastic step")


@dataclass
class Condition:
    """What the denoiser is conditioned on, batch first: prompt embeddings (B, L, D) and, for SDXL, SD 3
    and FLUX, pooled embeddings (B, D'). Sliced, repeated and concatenated along the batch together."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, rows) -> "Condition":
        return Condition(self.embeds[rows], None if self.pooled is None else self.pooled[rows])

    def _map(self, f) -> "Condition":
        return Condition(f(self.embeds), None if self.pooled is None else f(self.pooled))

    def repeat(self, times: int) -> "Condition":
        return self._map(lambda t: t.repeat(times, *[1] * (t.dim() - 1)))

    def expand(self, n: int) -> "Condition":
        """A batch of one made ``n`` rows (a view)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, *args, **kwargs) -> "Condition":
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(parts: list["Condition"]) -> "Condition":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Condition(torch.cat([p.embeds for p in parts]), pooled)


@dataclass
class Trajectory:
    """The denoising chains of one group of candidates, everything needed to re-score them."""

    prompt: str
    seeds: list[int]
    settings: SamplingSettings
    timesteps: torch.Tensor  # (T,) the scheduler's: int for DDIM, sigma * 1000 for flow matching
    latents: torch.Tensor  # (n, T + 1, C, h, w): x_T ... x_0
    log_probs: torch.Tensor  # (n, T): log-prob of latents[:, j + 1] given latents[:, j]
    prompt_embeds: torch.Tensor  # (1, L, D)
    negative_embeds: torch.Tensor  # (1, L, D), the empty prompt's
    # what some families add:
    pooled_embeds: torch.Tensor | None = None  # (1, D') SDXL, SD 3, FLUX
    negative_pooled_embeds: torch.Tensor | None = None  # (1, D') the empty prompt's (SDXL, SD 3)
    sigmas: torch.Tensor | None = None  # (T + 1,) flow matching: the noise level of each stored latent
    noise_level: float | None = None  # flow matching: the SDE's noise level the chains were drawn with
    fixed_steps: list[int] = field(default_factory=list)  # deterministic steps (std 0): no log-prob, never trained

    def scored_steps(self) -> list[int]:
        """The steps that carry a log-probability: every step but the deterministic ones."""
        return [j for j in range(len(self.timesteps)) if j not in self.fixed_steps]

    def condition(self) -> Condition:
        """The prompt's conditioning, a batch of one."""
        return Condition(self.prompt_embeds, self.pooled_embeds)

    def negative_condition(self) -> Condition:
        """The empty prompt's conditioning (classifier-free guidance), a batch of one."""
        return Condition(self.negative_embeds, self.negative_pooled_embeds)

    def select(self, indices: list[int]) -> "Trajectory":
        """The chains of some candidates only, in the given order (the survivors of a group)."""
        rows = torch.tensor(indices, dtype=torch.long)
        return replace(self, seeds=[self.seeds[i] for i in indices], latents=self.latents[rows], log_probs=self.log_probs[rows])

    @staticmethod
    def join(parts: list["Trajectory"]) -> "Trajectory":
        """One group from several draws of the same prompt and settings (rejection sampling draws in batches)."""
        first = parts[0]
        for part in parts[1:]:
            differs = [name for name, same in (
                ("prompt", part.prompt == first.prompt), ("sampling settings", part.settings == first.settings),
                ("timesteps", torch.equal(part.timesteps, first.timesteps)), ("noise level", part.noise_level == first.noise_level),
                ("fixed steps", part.fixed_steps == first.fixed_steps)) if not same]
            if differs:
                raise ValueError(f"trajectories of different {', '.join(differs)} cannot form one group: "
                                 f"{'; '.join(_difference(name, first, part) for name in differs)}")
        return replace(first, seeds=[s for part in parts for s in part.seeds],
                       latents=torch.cat([part.latents for part in parts]), log_probs=torch.cat([part.log_probs for part in parts]))

    def to_bytes(self) -> bytes:
        """Safetensors bytes: the tensors, with the prompt, seeds and settings as metadata."""
        tensors = {"timesteps": self.timesteps, "latents": self.latents, "log_probs": self.log_probs,
                   "prompt_embeds": self.prompt_embeds, "negative_embeds": self.negative_embeds}
        tensors.update({name: getattr(self, name) for name in OPTIONAL_TENSORS if getattr(self, name) is not None})
        about = {"prompt": self.prompt, "seeds": self.seeds, "settings": asdict(self.settings)}
        about.update({name: getattr(self, name) for name in ("noise_level", "fixed_steps") if getattr(self, name)})
        return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"trajectory": json.dumps(about)})

    @staticmethod
    def from_bytes(data: bytes) -> "Trajectory":
        tensors = load(data)
        about = json.loads(_metadata(data)["trajectory"])
        return Trajectory(about["prompt"], about["seeds"], SamplingSettings(**about["settings"]), tensors["timesteps"],
                          tensors["latents"], tensors["log_probs"], tensors["prompt_embeds"], tensors["negative_embeds"],
                          **{name: tensors.get(name) for name in OPTIONAL_TENSORS},
                          noise_level=about.get("noise_level"), fixed_steps=about.get("fixed_steps", []))


OPTIONAL_TENSORS = ("pooled_embeds", "negative_pooled_embeds", "sigmas")


def _difference(name: str, first: Trajectory, part: Trajectory) -> str:
    """How two draws differ in one field, for ``Trajectory.join``'s refusal."""
    if name == "timesteps":
        if first.timesteps.shape != part.timesteps.shape:
            return f"timesteps {len(first.timesteps)} vs {len(part.timesteps)}"
        j = int((first.timesteps != part.timesteps).nonzero()[0, 0])
        return f"timestep {j} {first.timesteps[j].item():g} vs {part.timesteps[j].item():g}"
    field = {"prompt": "prompt", "sampling settings": "settings", "noise level": "noise_level",
             "fixed steps": "fixed_steps"}[name]
    return f"{name} {getattr(first, field)!r} vs {getattr(part, field)!r}"


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes: an 8-byte little-endian length, then a JSON header."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})

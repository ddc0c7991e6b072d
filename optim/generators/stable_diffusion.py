"""Stable Diffusion 1.x / 2.x: a UNet predicting epsilon or v, one CLIP text encoder, stochastic DDIM.

- Conditioning: the CLIP text encoder's last hidden states for the prompt and for the empty prompt
  (classifier-free guidance), stored in fp32 (exact back in the model's dtype).
- Schedule and kernel: the checkpoint's scheduler made a ``DDIMScheduler`` (clipping and thresholding
  off: the Gaussian log-probability is exact only for the unclipped step); each step is
  ``kernels.ddim_step`` on the guided noise prediction, conditional and unconditional halves in one
  UNet call. With ``set_alpha_to_one=True`` the last step is deterministic (see ``kernels``).
- DPO error: ``||eps_theta(x_t) - eps||^2`` (or the v target for v-prediction models).
- LoRA on the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every transformer block.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from optim.generators.base import Generator
from optim.generators.kernels import ddim_std, ddim_step, epsilon_from_output, step_alphas
from optim.trajectory import Condition, Trajectory


class StableDiffusion(Generator):
    family = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    pipeline_options: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}
    denoiser_name = "unet"
    denoiser_label = "UNet"
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(self, pipeline, model_path, device, lora_rank: int = 4):
        super().__init__(pipeline, model_path, device, lora_rank)
        self.unet = self.denoiser
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.prediction_type = self.scheduler.config.prediction_type

    def make_scheduler(self, scheduler):
        # Stochastic DDIM whatever the checkpoint shipped with. Clipping and thresholding are off:
        # the Gaussian log-probability is exact only for the unclipped step.
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler.config, clip_sample=False, thresholding=False)

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_condition(self, prompt: str) -> tuple[Condition, Condition]:
        """Embeddings of the prompt and of the empty prompt (for guidance), each (1, L, D)."""
        tokens = self.tokenizer(
            [prompt, ""], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        embeds = self.text_encoder(tokens)[0].float()  # stored in fp32; exact back in the model's dtype
        return Condition(embeds[:1]), Condition(embeds[1:])

    def unet_kwargs(self, condition: Condition, n: int) -> dict:
        """What the UNet takes beside the latents, the timestep and the prompt embeddings (SDXL: pooled and time ids)."""
        return {}

    def denoise(self, latents: torch.Tensor, timesteps, condition: Condition) -> torch.Tensor:
        """The UNet's output in fp32, computed in the model's dtype: the one place inputs and outputs are cast."""
        extra = {k: {name: t.to(self.dtype) for name, t in v.items()} for k, v in self.unet_kwargs(condition, len(latents)).items()}
        return self.unet(latents.to(self.dtype), timesteps, condition.embeds.to(self.dtype), **extra).sample.float()

    def predict(self, latents: torch.Tensor, timesteps, embeds: torch.Tensor | Condition) -> torch.Tensor:
        """The UNet's output in fp32 for prompt embeddings (or a ``Condition``)."""
        return self.denoise(latents, timesteps, embeds if isinstance(embeds, Condition) else Condition(embeds))

    def guided_epsilon(self, latents, timestep, condition: Condition, negative: Condition, guidance: float, alpha_t: float):
        """The classifier-free-guided noise prediction for a batch, in one UNet call."""
        n = latents.shape[0]
        if guidance == 1.0:
            output = self.denoise(latents, timestep, condition.expand(n))
            return epsilon_from_output(output, latents, alpha_t, self.prediction_type)
        both = Condition.cat([negative.expand(n), condition.expand(n)])
        output = self.denoise(torch.cat([latents, latents]), timestep, both)
        output = epsilon_from_output(output, torch.cat([latents, latents]), alpha_t, self.prediction_type)
        unconditional, conditional = output.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    # ------------------------------------------------------------------ schedule and step

    def schedule(self, chains: Trajectory) -> None:
        self.scheduler.set_timesteps(chains.settings.steps)
        chains.timesteps = self.scheduler.timesteps.clone()

    def step(self, chains: Trajectory, j: int, latents: torch.Tensor, noise=None, prev_sample=None):
        settings = chains.settings
        t = chains.timesteps[j]
        alpha_t, alpha_prev = step_alphas(self.scheduler, int(t), settings.steps)
        eps = self.guided_epsilon(latents, t.to(self.device), chains.condition().to(self.device),
                                  chains.negative_condition().to(self.device), settings.guidance, alpha_t)
        return ddim_step(eps, latents, alpha_t, alpha_prev, settings.eta, noise=noise, prev_sample=prev_sample)

    def step_std(self, chains: Trajectory, j: int) -> float:
        alpha_t, alpha_prev = step_alphas(self.scheduler, int(chains.timesteps[j]), chains.settings.steps)
        return ddim_std(alpha_t, alpha_prev, chains.settings.eta)

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def image_size(self) -> int:
        return self.unet.config.sample_size * self.pipeline.vae_scale_factor

    # ------------------------------------------------------------------ DPO

    def denoising_error(self, latents, noise, timesteps, condition) -> torch.Tensor:
        """Per-sample mean squared error of the UNet's prediction (epsilon or v) on noised latents."""
        condition = condition if isinstance(condition, Condition) else Condition(condition)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.denoise(noisy, timesteps, condition)  # fp32, whatever the model's dtype
        return ((prediction - target) ** 2).flatten(1).mean(dim=1)

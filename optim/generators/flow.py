"""Flow matching: Stable Diffusion 3 / 3.5 and FLUX, rectified-flow transformers sampled through the Flow-GRPO SDE.

A rectified-flow model predicts the velocity ``v = eps - x0`` of ``x_s = (1 - s) x0 + s eps``; diffusers
samples it with the Euler ODE from s = 1 to 0 (``FlowMatchEulerDiscreteScheduler``, sigmas shifted by
the model's ``shift``). An ODE step has no log-probability, so the workbench samples the SDE with the
same marginals that Flow-GRPO derived (``kernels.flow_sde_step``): each step is a Gaussian action.

- Schedule: the checkpoint's own scheduler and the pipeline's own sigmas (SD 3: static shift; FLUX:
  ``np.linspace(1, 1/T, T)`` shifted by the resolution's ``mu``), stored with the chains (``sigmas``), so
  a stored step is re-scored on exactly the sigmas it was drawn with.
- ``noise_level`` (``Policy.load(path, noise_level=...)``): the SDE's ``a`` in (0, 1], default 0.7 (Flow-GRPO's
  for SD 3.5 and FLUX; ``kernels.check_noise_level`` says why not above 1); a room's ``eta`` scales it (eta 1:
  the level as set). Higher explores more and
  drifts further from the ODE's images; the level the chains were drawn with is stored with them.
- Guidance: SD 3 uses classifier-free guidance (the empty prompt's embeddings, both halves in one
  transformer call). FLUX-dev is guidance-distilled: the guidance scale is an input of the transformer
  (``guidance_embeds``) and there is one call per step, no negative prompt; FLUX-schnell takes none.
- DPO: Diffusion-DPO with the flow target: the winner and the loser share ``s`` and ``eps``, and
  ``err = mean ||v_theta(x_s) - (eps - x0)||^2``. ``s`` is the training sigma of the integer timestep
  drawn for the pair (the scheduler's ``sigmas`` at its construction, indexed from low noise to high),
  as diffusers' SD 3 and FLUX DreamBooth scripts index them; FLUX-dev's DPO error uses guidance
  ``TRAIN_GUIDANCE`` (the FLUX DreamBooth script's default).
- LoRA on the attention projections of every block, the joint blocks' text-stream projections
  included (``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``), as Flow-GRPO trains them.
- Latents are stored unpacked, (C, h, w), for FLUX too: FLUX's 2x2 patch packing is a permutation done
  around each transformer call, so the SDE step and its log-probability are the same on either layout.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from optim.generators.base import Generator
from optim.generators.kernels import DEFAULT_NOISE_LEVEL, check_noise_level, flow_sde_std, flow_sde_step
from optim.trajectory import Condition, Trajectory

TRAIN_GUIDANCE = 3.5  # FLUX-dev's distilled guidance for the DPO error


class FlowMatching(Generator):
    """What SD 3 and FLUX share: the SDE step, its schedule, the flow DPO error, the transformer's adapters."""

    denoiser_name = "transformer"
    denoiser_label = "transformer"
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    default_max_sequence_length = 256

    def __init__(self, pipeline, model_path, device, lora_rank: int = 4, noise_level: float = DEFAULT_NOISE_LEVEL,
                 max_sequence_length: int | None = None):
        noise_level = check_noise_level(noise_level)  # in (0, 1]: before the adapters are made
        super().__init__(pipeline, model_path, device, lora_rank)
        self.transformer = self.denoiser
        self.noise_level = noise_level
        # T5 tokens of the prompt: the pipeline's default, or fewer when the tokenizer says so
        t5 = getattr(pipeline, self.t5_tokenizer_name, None)
        limit = t5.model_max_length if t5 is not None else self.default_max_sequence_length
        self.max_sequence_length = max_sequence_length or min(self.default_max_sequence_length, limit)
        fresh = type(self.scheduler).from_config(self.scheduler.config)
        self.train_sigmas = fresh.sigmas.flip(0).float()  # index t (0 .. num_train_timesteps - 1): its noise level

    # ------------------------------------------------------------------ schedule and step

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """family: the pipeline's sigmas for ``steps`` steps, (T + 1,) from 1 down to 0."""
        raise NotImplementedError

    def schedule(self, chains: Trajectory) -> None:
        sigmas = self.sampling_sigmas(chains.settings.steps).float().cpu()
        chains.sigmas = sigmas
        chains.timesteps = self.scheduler.timesteps.float().cpu().clone()  # sigma * num_train_timesteps, as the pipeline
        chains.noise_level = self.noise_level * chains.settings.eta

    def step(self, chains: Trajectory, j: int, latents: torch.Tensor, noise=None, prev_sample=None):
        sigmas = chains.sigmas
        velocity = self.guided_velocity(latents, chains.timesteps[j].to(self.device), chains)
        return flow_sde_step(velocity, latents, float(sigmas[j]), float(sigmas[j + 1]), float(sigmas[1]), chains.noise_level,
                             noise=noise, prev_sample=prev_sample)

    def step_std(self, chains: Trajectory, j: int) -> float:
        sigmas = chains.sigmas
        return flow_sde_std(float(sigmas[j]), float(sigmas[j + 1]), float(sigmas[1]), chains.noise_level)[1]

    def guided_velocity(self, latents: torch.Tensor, timestep: torch.Tensor, chains: Trajectory) -> torch.Tensor:
        """family: the velocity the sampler follows at a step (guided as the model is), fp32."""
        raise NotImplementedError

    def velocity(self, latents: torch.Tensor, timesteps: torch.Tensor, condition: Condition, guidance: float) -> torch.Tensor:
        """family: the transformer's velocity in fp32 for a batch; ``timesteps`` (B,) on the scheduler's scale (sigma * 1000)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ DPO

    def denoising_error(self, latents, noise, timesteps, condition) -> torch.Tensor:
        """Per-sample ``mean ||v_theta(x_s) - (eps - x0)||^2`` at the training sigma of each integer timestep."""
        condition = condition if isinstance(condition, Condition) else Condition(condition)
        sigma = self.train_sigmas.to(latents.device)[timesteps.long()]
        s = sigma.view(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - s) * latents + s * noise
        prediction = self.velocity(noisy, sigma * self.scheduler.config.num_train_timesteps, condition, TRAIN_GUIDANCE)
        return ((prediction - (noise - latents)) ** 2).flatten(1).mean(dim=1)


class StableDiffusion3(FlowMatching):
    """SD 3 / 3.5: MMDiT transformer, two CLIP encoders and T5, classifier-free guidance."""

    family = "Stable Diffusion 3 / 3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    t5_tokenizer_name = "tokenizer_3"
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's

    @torch.no_grad()
    def encode_condition(self, prompt: str) -> tuple[Condition, Condition]:
        """CLIP-L and CLIP-G penultimate states (padded to T5's width) followed by T5's, and both pooled
        projections; the empty prompt's the same way (the pipeline's own ``encode_prompt``)."""
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=self.max_sequence_length)
        return Condition(embeds.float(), pooled.float()), Condition(negative.float(), negative_pooled.float())

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        options = {}
        if self.scheduler.config.get("use_dynamic_shifting"):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                calculate_shift,
            )

            h, w = self.latent_shape()[1:]
            patch = self.transformer.config.patch_size
            config = self.scheduler.config
            options["mu"] = calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                                            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                            config.get("max_shift", 1.16))
        self.scheduler.set_timesteps(steps, device="cpu", **options)
        return self.scheduler.sigmas

    def velocity(self, latents, timesteps, condition: Condition, guidance: float) -> torch.Tensor:
        return self.transformer(hidden_states=latents.to(self.dtype), timestep=timesteps,
                                encoder_hidden_states=condition.embeds.to(self.dtype),
                                pooled_projections=condition.pooled.to(self.dtype), return_dict=False)[0].float()

    def guided_velocity(self, latents, timestep, chains: Trajectory) -> torch.Tensor:
        n, guidance = latents.shape[0], chains.settings.guidance
        condition = chains.condition().to(self.device)
        if guidance == 1.0:
            return self.velocity(latents, timestep.expand(n), condition.expand(n), guidance)
        both = Condition.cat([chains.negative_condition().to(self.device).expand(n), condition.expand(n)])
        output = self.velocity(torch.cat([latents, latents]), timestep.expand(2 * n), both, guidance)
        unconditional, conditional = output.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    def image_size(self) -> int:
        return self.transformer.config.sample_size * self.pipeline.vae_scale_factor


class Flux(FlowMatching):
    """FLUX.1 (dev, schnell): MMDiT + single-stream transformer, CLIP pooled + T5, distilled guidance (dev)."""

    family = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    t5_tokenizer_name = "tokenizer_2"
    default_max_sequence_length = 512  # FluxPipeline's

    @torch.no_grad()
    def encode_condition(self, prompt: str) -> tuple[Condition, Condition]:
        """T5's states and CLIP's pooled output (the pipeline's own ``encode_prompt``); no negative: FLUX is
        not sampled with classifier-free guidance (its negative is empty)."""
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1, max_sequence_length=self.max_sequence_length)
        embeds = embeds.float()
        return Condition(embeds, pooled.float()), Condition(embeds[:, :0])

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        h, w = self.latent_shape()[1:]
        mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu", mu=mu)
        return self.scheduler.sigmas

    def velocity(self, latents, timesteps, condition: Condition, guidance: float) -> torch.Tensor:
        from diffusers import FluxPipeline

        n, channels, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, n, channels, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, self.dtype)
        text_ids = torch.zeros(condition.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        scale = None
        if self.transformer.config.guidance_embeds:
            scale = torch.full([n], guidance, device=self.device, dtype=torch.float32)
        output = self.transformer(hidden_states=packed.to(self.dtype), timestep=timesteps.to(self.dtype) / 1000,
                                  guidance=scale, pooled_projections=condition.pooled.to(self.dtype),
                                  encoder_hidden_states=condition.embeds.to(self.dtype), txt_ids=text_ids, img_ids=image_ids,
                                  return_dict=False)[0]
        # unpack: (n, h/2 * w/2, 4C) -> (n, C, h, w)
        output = output.view(n, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels, h, w)
        return output.float()

    def guided_velocity(self, latents, timestep, chains: Trajectory) -> torch.Tensor:
        n = latents.shape[0]
        return self.velocity(latents, timestep.expand(n), chains.condition().to(self.device).expand(n), chains.settings.guidance)

    def latent_shape(self) -> tuple[int, int, int]:
        size, scale = self.image_size(), self.pipeline.vae_scale_factor
        side = 2 * (size // (scale * 2))
        return (self.transformer.config.in_channels // 4, side, side)

    def image_size(self) -> int:
        """The VAE's ``sample_size`` (1024 in FLUX.1's release), else the pipeline's default (128 latents x 8)."""
        return getattr(self.vae.config, "sample_size", None) or self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

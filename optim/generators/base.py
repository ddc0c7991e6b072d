"""The generator interface: what every model family offers the room, the updates, the page and the exports.

A generator is a diffusers pipeline whose denoiser (a UNet or a transformer) carries LoRA adapters.
Whatever the family, it is a policy over denoising chains:

- ``sample`` draws a group of candidates in ONE batched run (guidance batched too) and records a
  ``Trajectory``: the latents at every step, the timesteps, each step's log-probability (every step is
  a Gaussian action, ``optim.generators.kernels``) and the prompt's conditioning. Each candidate has
  its own seed (from the group seed) and its own random generator for the initial latent and every
  step's noise, so one candidate can be re-drawn alone with ``seeds=[s]``.
- ``score_step`` re-scores one stored step under the current weights (``log_probs``: every step); the
  batch is laid out as in sampling, so with unchanged weights the ratio is exactly 1.
- ``reference()``: the reference policy is the same network with its adapters disabled.
- ``denoising_error``: the family's Diffusion-DPO error on noised clean latents (epsilon, v or
  velocity target); ``encode_images`` / ``decode`` go between images and latents.
- Versions are adapter weights (``lora_state_dict``, ``save_version``, ``use_version``) in a
  ``VersionStore``; ``export_lora`` hands one out as the family's diffusers LoRA file (the adapters and
  versions: ``adapters.py``, a mixin of ``Generator``).

A family (``stable_diffusion.py``, ``sdxl.py``, ``flow.py``) says what differs: its pipeline class and
how it is loaded, its text encoders and conditioning (``encode_condition``), its schedule and step
kernel (``schedule``, ``step``), its LoRA target layers, its latent shape and its DPO error.

Precision (``dtype``): the frozen networks run in bf16, fp16 or fp32; the LoRA weights stay fp32 (so do
their optimizer states), and everything computed from a network's output (latents, the step, log-probs,
KL, DPO errors) is fp32: each family casts the denoiser's input to the model's dtype and its output back
to fp32 in one place. Sampling and re-scoring run the same casts on the same numbers, so the ratio
before an update is exactly 1 in every dtype. Default: bf16 on a GPU that supports it, else fp16; fp32
on the CPU.
"""

from __future__ import annotations

import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from optim.generators.adapters import LoraAdapters
from optim.trajectory import Condition, SamplingSettings, Trajectory

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "data" / "pretrained" / "generator"
MAX_CANDIDATES = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DECODE_CHUNK = 8  # images per VAE decoder call: a group of 64 never decodes at once


class ModelLoadError(ValueError):
    """A model folder that is missing, not a diffusers pipeline, or of an unsupported kind."""


@dataclass
class Samples:
    images: list[Image.Image]
    trajectory: Trajectory


def candidate_seeds(seed: int, n: int) -> list[int]:
    """Per-candidate seeds for a group: a prefix-stable stream, so n=2 gives the first two of n=4."""
    stream = random.Random(seed)
    return [stream.getrandbits(31) for _ in range(n)]


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The frozen networks' dtype: the one asked for, or bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 elsewhere."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def quiet_libraries() -> None:
    """No progress bars or info logs from transformers and diffusers (before diffusers imports its image processors)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


class Generator(LoraAdapters):
    """A diffusers pipeline with LoRA adapters on its denoiser, as a policy over denoising chains.

    Subclasses (one per family) set the class attributes and implement the methods marked "family".
    """

    family: ClassVar[str] = "generator"  # the README's name for the family
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # the model_index.json ``_class_name`` values it loads
    pipeline_options: ClassVar[dict] = {}  # extra ``from_pretrained`` arguments
    denoiser_name: ClassVar[str] = "unet"  # the pipeline component that carries the adapters
    denoiser_label: ClassVar[str] = "UNet"  # what messages call it
    lora_targets: ClassVar[list[str]] = []  # the adapted layers (name suffixes)

    def __init__(self, pipeline, model_path: Path, device: torch.device, lora_rank: int = 4):
        self.pipeline = pipeline
        self.model_path = model_path
        self.device = device
        self.denoiser = getattr(pipeline, self.denoiser_name)
        self.vae = pipeline.vae
        self.scheduler = self.make_scheduler(pipeline.scheduler)
        pipeline.scheduler = self.scheduler
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.dtype = self.denoiser.dtype
        self.vae_dtype = self.vae.dtype  # the model's, unless a family upcasts its VAE
        self.add_adapters(lora_rank)
        # Activations recomputed in backward instead of kept: on a GPU an update's memory is mostly
        # activations; on the CPU memory is plentiful and recomputing only costs time.
        self.gradient_checkpointing = device.type == "cuda"
        self.initial_lora: dict | None = None  # {"file", "sha256"} of the diffusers LoRA the adapters started from
        self.version: str | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, model: str | Path | None = None, device: str | None = None, lora_rank: int = 4,
             dtype: str | None = None, lora: str | Path | None = None, **options) -> Generator:
        """Load the embedded default (``model=None``) or a local diffusers folder of any supported family;
        cuda when present. The family comes from ``model_index.json`` (``optim.generators.family_for``).

        ``dtype``: "bf16", "fp16" or "fp32" for the frozen networks; None picks (see ``resolve_dtype``).
        ``lora``: a diffusers LoRA file the adapters start from (``start_from_lora``). ``options``: the
        family's own settings (the flow families' ``noise_level``).
        """
        from optim.generators import FAMILIES, family_for

        quiet_libraries()
        path = Path(model) if model is not None else DEFAULT_MODEL
        if model is None and not path.exists():
            raise ModelLoadError(f"the embedded default model is missing at {path}; rebuild it with python -m optim.pretrain")
        family = family_for(path)
        if not issubclass(family, cls):
            raise ModelLoadError(f"{path} holds a {family.family} model, not a {cls.family} one")
        for name in options:
            if name not in inspect.signature(family.__init__).parameters:
                takers = [f.family for f in FAMILIES if name in inspect.signature(f.__init__).parameters]
                raise ModelLoadError(f"{path} holds a {family.family} model, which takes no {name} setting "
                                     f"(--{name.replace('_', '-')})" + (f": only {' and '.join(takers)} models do" if takers else ""))
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipeline = family.load_pipeline(path, resolve_dtype(dtype, target))
        if target.type == "cuda":  # TF32 matmuls and convolutions for what stays fp32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        pipeline.to(target)
        pipeline.set_progress_bar_config(disable=True)
        policy = family(pipeline, path.resolve(), target, lora_rank, **options)
        if lora is not None:
            policy.start_from_lora(lora)
        return policy

    @classmethod
    def load_pipeline(cls, path: Path, torch_dtype: torch.dtype):
        """The family's diffusers pipeline from a local folder, nothing downloaded. Components the folder
        leaves out (``[null, null]`` in its index: an SD 3 without T5, an SD without a safety checker) are None."""
        import diffusers

        pipeline_class = getattr(diffusers, cls.pipeline_classes[0])
        index = json.loads((path / "model_index.json").read_text())
        absent = {name: None for name, value in index.items() if isinstance(value, list) and value and value[0] is None}
        pickled = sorted(f"{component.name}/{weights.name}" for component in path.iterdir() if component.is_dir()
                         and not any(component.glob("*.safetensors"))
                         for weights in (*component.glob("*.bin"), *component.glob("*.ckpt"), *component.glob("*.pt")))
        if pickled:  # diffusers would look for safetensors on the hub first, and say only that it found none
            raise ModelLoadError(f"{path} holds pickled weights ({', '.join(pickled)}) and no safetensors for them: the "
                                 "workbench never unpickles a checkpoint (loading a pickle can run code); convert them "
                                 "to safetensors (pipeline.save_pretrained(folder, safe_serialization=True) in a trusted "
                                 "environment)")
        try:
            return pipeline_class.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=torch_dtype,
                                                  **{**absent, **cls.pipeline_options})
        except (OSError, ValueError, TypeError) as error:
            raise ModelLoadError(f"could not load the pipeline in {path}: {error}") from error

    def make_scheduler(self, scheduler):
        """family: the scheduler the step kernel reads (DDIM families replace the checkpoint's)."""
        return scheduler

    # ------------------------------------------------------------------ sampling and scoring

    @torch.no_grad()
    def sample(
        self,
        prompt: str,
        n: int = 4,
        seed: int = 0,
        steps: int = 20,
        guidance: float = 5.0,
        eta: float = 1.0,
        seeds: list[int] | None = None,
    ) -> Samples:
        """Draw ``n`` candidates for ``prompt`` in one batched run, recording their trajectories."""
        if not prompt or not prompt.strip():
            raise ValueError("prompt is empty: describe the image to generate, e.g. 'CT: axial slice of the abdomen'")
        seeds = list(seeds) if seeds is not None else candidate_seeds(seed, n)
        if not 1 <= len(seeds) <= MAX_CANDIDATES:
            raise ValueError(f"n must be between 1 and {MAX_CANDIDATES}, got {len(seeds)}")
        settings = SamplingSettings(steps, guidance, eta)
        settings.check()
        chains = self.begin(prompt, seeds, settings)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = self.latent_shape()

        def noise() -> torch.Tensor:  # one draw per candidate, from that candidate's own generator
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

        latents = noise() * getattr(self.scheduler, "init_noise_sigma", 1.0)
        chain, log_probs = [latents], []
        for j in range(len(chains.timesteps)):
            latents, log_prob, _, std = self.step(chains, j, latents, noise=noise())
            chain.append(latents)
            log_probs.append(log_prob)
            if std == 0:
                chains.fixed_steps.append(j)
        chains.latents = torch.stack(chain, dim=1)
        chains.log_probs = torch.stack(log_probs, dim=1)
        return Samples(self.decode(latents), chains)

    def begin(self, prompt: str, seeds: list[int], settings: SamplingSettings) -> Trajectory:
        """A group's trajectory before its first step: the conditioning and the schedule, no latents yet."""
        positive, negative = self.encode_condition(prompt)
        chains = Trajectory(prompt, seeds, settings, timesteps=torch.empty(0), latents=None, log_probs=None,
                            prompt_embeds=positive.embeds, negative_embeds=negative.embeds,
                            pooled_embeds=positive.pooled, negative_pooled_embeds=negative.pooled)
        self.schedule(chains)
        return chains

    def score_step(self, trajectory: Trajectory, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(log_prob (n,), mean, std)`` of the stored move at ``step`` under the current weights,
        for the candidates ``rows`` (all by default; an update's micro-batch otherwise).

        Gradients flow when called outside ``no_grad``. The batch is laid out exactly as in
        sampling, so unchanged weights give identical numbers. The mean is what the KL between two
        policies' step kernels needs (they share the std).
        """
        x_t = trajectory.latents[rows, step].to(self.device)
        x_prev = trajectory.latents[rows, step + 1].to(self.device)
        _, log_prob, mean, std = self.step(trajectory, step, x_t, prev_sample=x_prev)
        return log_prob, mean, std

    @torch.no_grad()
    def log_probs(self, trajectory: Trajectory) -> torch.Tensor:
        """Re-score every stored step under the current weights: (n, T) (0 at deterministic steps)."""
        return torch.stack([self.score_step(trajectory, j)[0] for j in range(len(trajectory.timesteps))], dim=1)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Clean latents (N, C, h, w) of images at the model's size: DPO on imported pairs needs them."""
        size = self.image_size()
        pixels = self.pipeline.image_processor.preprocess([im.convert("RGB") for im in images], height=size, width=size)
        latents = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None)
        return (latents if shift is None else latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Images from final latents, ``DECODE_CHUNK`` at a time: the decoder's activations at full
        resolution are the largest tensors of sampling."""
        shift = getattr(self.vae.config, "shift_factor", None)
        images = []
        for chunk in (latents / self.vae.config.scaling_factor).split(DECODE_CHUNK):
            chunk = chunk if shift is None else chunk + shift
            pixels = self.vae.decode(chunk.to(self.vae_dtype)).sample.float()
            images += self.pipeline.image_processor.postprocess(pixels, output_type="pil")
        return images

    # ------------------------------------------------------------------ what each family says

    def encode_condition(self, prompt: str) -> tuple[Condition, Condition]:
        """family: the prompt's and the empty prompt's conditioning, each a batch of one, fp32."""
        raise NotImplementedError

    def schedule(self, chains: Trajectory) -> None:
        """family: set ``chains.timesteps`` (and a flow family's sigmas and noise level) for its settings."""
        raise NotImplementedError

    def step(self, chains: Trajectory, j: int, latents: torch.Tensor, noise: torch.Tensor | None = None,
             prev_sample: torch.Tensor | None = None):
        """family: step ``j`` of ``chains`` from ``latents`` under the current weights, guided as in sampling:
        ``(x_prev, log_prob, mean, std)``; draws with ``noise`` or scores ``prev_sample``."""
        raise NotImplementedError

    def step_std(self, chains: Trajectory, j: int) -> float:
        """family: the std of step ``j``'s kernel in ``chains``, fixed by the schedule (``step`` returns the same)."""
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        """family: one candidate's latent shape (C, h, w)."""
        raise NotImplementedError

    def image_size(self) -> int:
        """family: the side in pixels the model draws (and ``encode_images`` resizes to)."""
        raise NotImplementedError

    def denoising_error(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                        condition: Condition | torch.Tensor) -> torch.Tensor:
        """family: per-sample mean squared error of the denoiser's prediction on clean ``latents`` noised by
        ``noise`` at training ``timesteps`` (ints in [0, num_train_timesteps)), fp32: Diffusion-DPO's error."""
        raise NotImplementedError

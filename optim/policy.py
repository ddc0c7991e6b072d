"""The generator as a policy: a diffusers Stable Diffusion pipeline with LoRA, sampled step by step.

``Policy.sample`` draws a group of candidates in ONE batched run (classifier-free guidance batched
too) with stochastic DDIM, and records what GRPO and DPO need: the latents at every step, the
timesteps, each step's log-probability under the guided policy, and the prompt embeddings.
``Policy.log_probs`` re-scores a stored trajectory under the current weights; with unchanged
weights the ratio is exactly 1.

Each candidate has its own seed (drawn from the group seed), and its own random generator for the
initial latent and every step's noise, so one candidate can be re-drawn alone with ``seeds=[s]``.

The reference policy is the same network with the LoRA adapters disabled (``with
policy.reference():``). Versions are adapter weights in a ``VersionStore``.

Precision (``dtype``): the frozen networks (UNet base weights, VAE, text encoder) run in bf16, fp16
or fp32; the LoRA weights stay fp32 (so do their optimizer states), and everything computed from a
network's output (latents, the stochastic step, log-probabilities, KL, DPO errors) is fp32: the UNet
input is cast to the model's dtype and its output back to fp32 in one place (``Policy.predict``).
Sampling and re-scoring run the same casts on the same numbers, so the ratio before an update is
exactly 1 in every dtype. Default: bf16 on a GPU that supports it, else fp16; fp32 on the CPU.

Command line::

    python -m optim.policy sample --prompt "OCT: retinal layers with subretinal fluid" -n 4 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from optim.logprob import ddim_step, epsilon_from_output, step_alphas
from optim.trajectory import SamplingSettings, Trajectory
from optim.versions import Version, VersionStore

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "pretrained" / "generator"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
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


def check_model_folder(path: Path) -> None:
    """Refuse, with a message that says what is wrong, anything that is not an SD 1.x/2.x folder."""
    if not path.exists():
        raise ModelLoadError(f"model folder not found: {path}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    kind = json.loads(index.read_text()).get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"{path} holds a {kind}, which is not supported: load a Stable Diffusion 1.x/2.x-style "
            f"pipeline ({', '.join(SUPPORTED_PIPELINES)})"
        )


def _linear_in_input_dtype(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` with the weight cast to the input's dtype (a LoRA matrix: small, so the cast is cheap)."""
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


class Policy:
    def __init__(self, pipeline, model_path: Path, device: torch.device, lora_rank: int = 4):
        from diffusers import DDIMScheduler
        from peft import LoraConfig

        self.pipeline = pipeline
        self.model_path = model_path
        self.device = device
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        # Stochastic DDIM whatever the checkpoint shipped with. Clipping and thresholding are off:
        # the Gaussian log-probability is exact only for the unclipped step.
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False, thresholding=False)
        pipeline.scheduler = self.scheduler
        self.prediction_type = self.scheduler.config.prediction_type
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        # LoRA starts with B = 0, so the adapted network is exactly the base network until trained. A is
        # drawn from a normal with std 1/r ("gaussian", as ddpo-pytorch, Flow-GRPO and the diffusers DPO example do):
        # peft's default kaiming-uniform A is 4x smaller here and shrinks with the layer width, which made
        # every update move the images about ten times less for the same steps.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.unet.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
            )
        self.dtype = self.unet.dtype
        self._mixed_precision_adapters()
        # Activations recomputed in backward instead of kept: on a GPU an update's memory is mostly
        # activations; on the CPU memory is plentiful and recomputing only costs time.
        self.gradient_checkpointing = device.type == "cuda"
        self.initial_lora: dict | None = None  # {"file", "sha256"} of the diffusers LoRA the adapters started from
        self.version: str | None = None

    def _mixed_precision_adapters(self) -> None:
        """Adapter WEIGHTS in fp32 (they and their optimizer states train there), adapter ARITHMETIC in the model's dtype.

        peft creates the adapters in the base layers' dtype; they are made fp32 here. peft would then cast
        every adapted layer's activations to fp32 and the sum back, which made half-precision sampling 1.5x
        slower than diffusers' pipeline on an H100. Instead each LoRA matrix is cast to its input's dtype for
        the product (as autocast does; gradients still reach the fp32 weights), and peft's input cast is off.
        In an fp32 model nothing changes. Sampling and scoring do the same arithmetic, so the ratio stays 1.
        """
        from peft.tuners.lora import LoraLayer

        for parameter in self.lora_parameters():
            parameter.data = parameter.data.float()
        for layer in self.unet.modules():
            matrices = [*layer.lora_A.values(), *layer.lora_B.values()] if isinstance(layer, LoraLayer) else []
            if matrices and all(type(m) is torch.nn.Linear for m in matrices):  # conv adapters keep peft's casts
                layer.cast_input_dtype_enabled = False
                for matrix in matrices:
                    matrix.forward = types.MethodType(_linear_in_input_dtype, matrix)

    @classmethod
    def load(cls, model: str | Path | None = None, device: str | None = None, lora_rank: int = 4,
             dtype: str | None = None, lora: str | Path | None = None) -> "Policy":
        """Load the embedded default (``model=None``) or a local diffusers folder; cuda when present.

        ``dtype``: "bf16", "fp16" or "fp32" for the frozen networks; None picks (see ``resolve_dtype``).
        ``lora``: a diffusers LoRA file the adapters start from (``start_from_lora``).
        """
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()  # before diffusers imports its image processors
        transformers_logging.disable_progress_bar()
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        path = Path(model) if model is not None else DEFAULT_MODEL
        if model is None and not path.exists():
            raise ModelLoadError(f"the embedded default model is missing at {path}; rebuild it with python -m optim.pretrain")
        check_model_folder(path)
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, target)
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                path, safety_checker=None, requires_safety_checker=False, local_files_only=True, use_safetensors=True,
                dtype=torch_dtype,
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not load the pipeline in {path}: {error}") from error
        if target.type == "cuda":  # TF32 matmuls and convolutions for what stays fp32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        pipeline.to(target)
        pipeline.set_progress_bar_config(disable=True)
        policy = cls(pipeline, path.resolve(), target, lora_rank)
        if lora is not None:
            policy.start_from_lora(lora)
        return policy

    def start_from_lora(self, path: str | Path) -> None:
        """Replace the fresh adapters by a diffusers LoRA file's: its rank, alpha, target layers and weights.

        The file is read by diffusers' own ``load_lora_weights`` (so any format it reads works), then the
        adapters are made fp32 and given the file's exact values (in a half-precision model they were
        created in half). The policy's first version is then "base + this LoRA"; the reference policy
        (adapters disabled) stays the base model. Text-encoder LoRA weights are refused: only the UNet trains.
        """
        import hashlib

        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"LoRA file not found: {path}")
        try:
            state, _ = StableDiffusionPipeline.lora_state_dict(str(path), use_safetensors=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not read the LoRA file {path}: {error}") from error
        others = sorted({key.split(".")[0] for key in state if not key.startswith("unet.")})
        if others:
            raise ModelLoadError(f"{path} also adapts {', '.join(others)}: the workbench trains the UNet's adapters only; "
                                 "export a UNet-only LoRA")
        if not state:
            raise ModelLoadError(f"{path} holds no UNet LoRA weights (keys prefixed 'unet.')")
        weights = {key[len("unet."):]: value for key, value in state.items()}
        if not any("lora_A" in key for key in weights):
            weights = convert_unet_state_dict_to_peft(weights)
        self.unet.delete_adapters("default")
        try:
            self.pipeline.load_lora_weights(str(path), adapter_name="default")
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"the LoRA file {path} does not fit the model {self.model_path}: {error}") from error
        self._mixed_precision_adapters()
        self.load_lora_state_dict(weights)
        self.initial_lora = {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def adapter_config(self) -> dict:
        """The adapters' rank, alpha and target layers: what a LoRA file needs beside its tensors."""
        config = self.unet.peft_config["default"]
        targets = config.target_modules
        fields = {"r": config.r, "lora_alpha": config.lora_alpha,
                  "target_modules": targets if isinstance(targets, str) else sorted(targets)}
        fields.update({name: dict(value) for name in ("rank_pattern", "alpha_pattern") if (value := getattr(config, name))})
        return fields

    # ------------------------------------------------------------------ adapters and versions

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the same UNet with its LoRA adapters disabled."""
        self.unet.disable_adapters()
        try:
            yield self
        finally:
            self.unet.enable_adapters()

    @contextlib.contextmanager
    def training(self):
        """The span of an update: gradient checkpointing on the UNet when ``gradient_checkpointing`` is set.

        diffusers checkpoints its blocks whenever gradients are enabled, whatever ``train()`` says, so
        the UNet stays in eval mode (no dropout anywhere) and passes under ``no_grad`` (the reference,
        the trust region) are unaffected. The previous setting comes back afterwards.
        """
        was = self.unet.is_gradient_checkpointing
        if self.gradient_checkpointing and not was:
            self.unet.enable_gradient_checkpointing()
        try:
            yield self
        finally:
            if not was and self.unet.is_gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.unet.named_parameters() if "lora_" in name]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.unet).items()}

    def load_lora_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.unet, {k: v.to(self.device) for k, v in weights.items()})
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"adapter weights do not fit this model: unexpected keys such as {unexpected[0]}")

    def save_version(self, store: VersionStore, algorithm: str | None = None, metrics: dict | None = None) -> Version:
        """Save the current adapter weights as a new version (made current) and switch to it."""
        version = store.save(
            self.lora_state_dict(), parent=self.version, algorithm=algorithm, base_model=str(self.model_path), metrics=metrics
        )
        self.version = version.id
        return version

    def use_version(self, store: VersionStore, version_id: str) -> Version:
        """Load the weights of ``version_id`` into the UNet's adapters."""
        version = store.get(version_id)
        if version.base_model != str(self.model_path):
            raise ValueError(
                f"version {version_id} was trained on {version.base_model}, not on the loaded model {self.model_path}"
            )
        self._check_same_start(store)
        self.load_lora_state_dict(store.weights(version_id))
        self.version = version.id
        return version

    def open_versions(self, store: VersionStore) -> Version:
        """Load the store's current version, creating ``v0`` in an empty store: the base model, or base + the
        LoRA file the policy started from (recorded in its metrics as ``initial_lora``)."""
        if store.current is None:
            return self.save_version(store, algorithm=None, metrics={"initial_lora": self.initial_lora} if self.initial_lora else {})
        return self.use_version(store, store.current)

    def _check_same_start(self, store: VersionStore) -> None:
        """A store's versions fit only adapters shaped like its first version's: refuse another starting LoRA."""
        started = store.list()[0].metrics.get("initial_lora")
        if (started or {}).get("sha256") != (self.initial_lora or {}).get("sha256"):
            def describe(lora):
                return f"the LoRA file {lora['file']}" if lora else "the base model (no LoRA file)"

            hint = f"--lora {started['file']}" if started else "no --lora"
            raise ModelLoadError(f"the versions in {store.root} start from {describe(started)}, but this model starts from "
                                 f"{describe(self.initial_lora)}: start with {hint}, or use another work directory")

    # ------------------------------------------------------------------ sampling and scoring

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the prompt and of the empty prompt (for guidance), each (1, L, D)."""
        tokens = self.tokenizer(
            [prompt, ""], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        embeds = self.text_encoder(tokens)[0].float()  # stored in fp32; exact back in the model's dtype
        return embeds[:1], embeds[1:]

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The UNet's output in fp32, computed in the model's dtype: the one place inputs and outputs are cast."""
        return self.unet(latents.to(self.dtype), timesteps, embeds.to(self.dtype)).sample.float()

    def guided_epsilon(self, latents, timestep, prompt_embeds, negative_embeds, guidance: float, alpha_t: float):
        """The classifier-free-guided noise prediction for a batch, in one UNet call."""
        n = latents.shape[0]
        if guidance == 1.0:
            output = self.predict(latents, timestep, prompt_embeds.expand(n, -1, -1))
            return epsilon_from_output(output, latents, alpha_t, self.prediction_type)
        embeds = torch.cat([negative_embeds.expand(n, -1, -1), prompt_embeds.expand(n, -1, -1)])
        output = self.predict(torch.cat([latents, latents]), timestep, embeds)
        output = epsilon_from_output(output, torch.cat([latents, latents]), alpha_t, self.prediction_type)
        unconditional, conditional = output.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

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
        prompt_embeds, negative_embeds = self.encode_prompt(prompt)
        self.scheduler.set_timesteps(steps)
        timesteps = self.scheduler.timesteps.clone()
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = self.latent_shape()

        def noise() -> torch.Tensor:  # one draw per candidate, from that candidate's own generator
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

        latents = noise() * self.scheduler.init_noise_sigma
        chain, log_probs = [latents], []
        for t in timesteps:
            alpha_t, alpha_prev = step_alphas(self.scheduler, int(t), steps)
            eps = self.guided_epsilon(latents, t, prompt_embeds, negative_embeds, guidance, alpha_t)
            latents, log_prob, _, _ = ddim_step(eps, latents, alpha_t, alpha_prev, eta, noise=noise())
            chain.append(latents)
            log_probs.append(log_prob)
        trajectory = Trajectory(
            prompt=prompt,
            seeds=seeds,
            settings=settings,
            timesteps=timesteps,
            latents=torch.stack(chain, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            prompt_embeds=prompt_embeds,
            negative_embeds=negative_embeds,
        )
        return Samples(self.decode(latents), trajectory)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Clean latents (N, C, h, w) of images at the model's size: DPO on imported pairs needs them."""
        size = self.unet.config.sample_size * self.pipeline.vae_scale_factor
        pixels = self.pipeline.image_processor.preprocess([im.convert("RGB") for im in images], height=size, width=size)
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean.float()
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Images from final latents, ``DECODE_CHUNK`` at a time: the decoder's activations at full
        resolution are the largest tensors of sampling."""
        images = []
        for chunk in (latents / self.vae.config.scaling_factor).split(DECODE_CHUNK):
            pixels = self.vae.decode(chunk.to(self.dtype)).sample.float()
            images += self.pipeline.image_processor.postprocess(pixels, output_type="pil")
        return images

    def score_step(self, trajectory: Trajectory, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(log_prob (n,), mean, std)`` of the stored move at ``step`` under the current weights,
        for the candidates ``rows`` (all by default; an update's micro-batch otherwise).

        Gradients flow when called outside ``no_grad``. The batch is laid out exactly as in
        sampling, so unchanged weights give identical numbers. The mean is what the KL between two
        policies' step kernels needs (they share the std).
        """
        settings = trajectory.settings
        t = int(trajectory.timesteps[step])
        alpha_t, alpha_prev = step_alphas(self.scheduler, t, settings.steps)
        x_t = trajectory.latents[rows, step].to(self.device)
        eps = self.guided_epsilon(
            x_t,
            trajectory.timesteps[step].to(self.device),
            trajectory.prompt_embeds.to(self.device),
            trajectory.negative_embeds.to(self.device),
            settings.guidance,
            alpha_t,
        )
        x_prev = trajectory.latents[rows, step + 1].to(self.device)
        _, log_prob, mean, std = ddim_step(eps, x_t, alpha_t, alpha_prev, settings.eta, prev_sample=x_prev)
        return log_prob, mean, std

    @torch.no_grad()
    def log_probs(self, trajectory: Trajectory) -> torch.Tensor:
        """Re-score every stored step under the current weights: (n, T)."""
        return torch.stack([self.score_step(trajectory, j)[0] for j in range(len(trajectory.timesteps))], dim=1)


# ---------------------------------------------------------------------- command line


def _sample_command(args) -> None:
    policy = Policy.load(args.model, dtype=args.dtype, lora=args.lora)
    if args.version:
        policy.use_version(VersionStore(Path(args.workdir) / "versions"), args.version)
    result = policy.sample(args.prompt, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance, eta=args.eta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trajectory = result.trajectory
    candidates = []
    for i, (image, seed) in enumerate(zip(result.images, trajectory.seeds)):
        name = f"candidate_{i}.png"
        image.save(out / name)
        candidates.append({"index": i, "file": name, "seed": seed, "log_probs": trajectory.log_probs[i].tolist()})
    record = {
        "prompt": args.prompt,
        "model": str(policy.model_path),
        "version": policy.version or "base",
        "dtype": dtype_name(policy.dtype),
        "steps": args.steps,
        "guidance": args.guidance,
        "eta": args.eta,
        "group_seed": args.seed,
        "timesteps": trajectory.timesteps.tolist(),
        "candidates": candidates,
    }
    (out / "samples.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(candidates)} candidates and samples.json to {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optim.policy", description="Sample from the generator.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="draw candidates, write PNGs and samples.json")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("-n", type=int, default=4, help="number of candidates (default 4)")
    sample.add_argument("--seed", type=int, default=0, help="group seed; candidate seeds derive from it")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--model", default=None, help="local diffusers folder (default: the embedded model)")
    sample.add_argument("--version", default=None, help="LoRA version id from --workdir, e.g. v3")
    sample.add_argument("--workdir", default="runs/demo", help="work directory holding versions/ (default runs/demo)")
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--guidance", type=float, default=5.0)
    sample.add_argument("--eta", type=float, default=1.0)
    sample.add_argument("--lora", default=None, help="diffusers LoRA file the adapters start from (as app.py --lora)")
    sample.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="frozen networks' precision (default: bf16 or fp16 on a GPU, fp32 on the CPU)")
    args = parser.parse_args(argv)
    try:
        _sample_command(args)
    except (ModelLoadError, ValueError, KeyError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

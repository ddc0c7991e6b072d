"""LoRA adapters on a generator's denoiser, and versions of them: what every family shares here.

- The adapters start with B = 0 (the adapted network is exactly the base network until trained), A
  drawn from a normal with std 1/r; their weights and optimizer states are fp32, their arithmetic in
  the model's dtype (``_mixed_precision_adapters``).
- ``reference()`` disables them: the reference policy of GRPO's KL and of DPO is the base network.
- ``training()`` is the span of an update (gradient checkpointing on a GPU).
- A version is the adapters' weights in a ``VersionStore``; ``export_lora`` hands one out as the
  family's diffusers LoRA file and ``start_from_lora`` starts from one.

``LoraAdapters`` is a mixin of ``base.Generator``: it reads the generator's ``denoiser``,
``denoiser_name``, ``denoiser_label``, ``lora_targets``, ``pipeline``, ``device``, ``model_path``,
``version`` and ``initial_lora``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import types
from pathlib import Path

import torch
from safetensors import SafetensorError

from optim.versions import Version, VersionStore, model_fingerprint


def _linear_in_input_dtype(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` with the weight cast to the input's dtype (a LoRA matrix: small, so the cast is cheap)."""
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


class LoraAdapters:
    """LoRA adapters on ``self.denoiser`` and their versions (a mixin of ``base.Generator``)."""

    def add_adapters(self, lora_rank: int) -> None:
        """Fresh adapters of rank ``lora_rank`` on the family's target layers."""
        from peft import LoraConfig

        # LoRA starts with B = 0, so the adapted network is exactly the base network until trained. A is
        # drawn from a normal with std 1/r ("gaussian", as ddpo-pytorch, Flow-GRPO and the diffusers DPO example do):
        # peft's default kaiming-uniform A is 4x smaller here and shrinks with the layer width, which made
        # every update move the images about ten times less for the same steps.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.denoiser.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=self.lora_targets)
            )
        self._mixed_precision_adapters()

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
        for layer in self.denoiser.modules():
            matrices = [*layer.lora_A.values(), *layer.lora_B.values()] if isinstance(layer, LoraLayer) else []
            if matrices and all(type(m) is torch.nn.Linear for m in matrices):  # conv adapters keep peft's casts
                layer.cast_input_dtype_enabled = False
                for matrix in matrices:
                    matrix.forward = types.MethodType(_linear_in_input_dtype, matrix)
    def start_from_lora(self, path: str | Path) -> None:
        """Replace the fresh adapters by a diffusers LoRA file's: its rank, alpha, target layers and weights.

        The file is read by diffusers' own ``load_lora_weights`` (so any format it reads works), then the
        adapters are made fp32 and given the file's exact values (in a half-precision model they were
        created in half). The policy's first version is then "base + this LoRA"; the reference policy
        (adapters disabled) stays the base model. Text-encoder LoRA weights are refused: only the denoiser trains.
        """
        from diffusers.utils import convert_unet_state_dict_to_peft

        from optim.generators.base import ModelLoadError

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"LoRA file not found: {path}")
        try:
            state = type(self.pipeline).lora_state_dict(str(path), use_safetensors=True)
        except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: not safetensors, or cut short
            raise ModelLoadError(f"could not read the LoRA file {path}: {error}") from error
        state = state[0] if isinstance(state, tuple) else state
        prefix, label = f"{self.denoiser_name}.", self.denoiser_label
        others = sorted({key.split(".")[0] for key in state if not key.startswith(prefix)})
        if others:
            raise ModelLoadError(f"{path} also adapts {', '.join(others)}: the workbench trains the {label}'s adapters only; "
                                 f"export a {label}-only LoRA")
        if not state:
            raise ModelLoadError(f"{path} holds no {label} LoRA weights (keys prefixed '{prefix}')")
        weights = {key[len(prefix):]: value for key, value in state.items()}
        if not any("lora_A" in key for key in weights):
            weights = convert_unet_state_dict_to_peft(weights)
        self.denoiser.delete_adapters("default")
        try:
            self.pipeline.load_lora_weights(str(path), adapter_name="default")
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"the LoRA file {path} does not fit the model {self.model_path}: {error}") from error
        self._mixed_precision_adapters()
        self.load_lora_state_dict(weights)
        self.initial_lora = {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def adapter_config(self) -> dict:
        """The adapters' rank, alpha and target layers: what a LoRA file needs beside its tensors."""
        config = self.denoiser.peft_config["default"]
        targets = config.target_modules
        fields = {"r": config.r, "lora_alpha": config.lora_alpha,
                  "target_modules": targets if isinstance(targets, str) else sorted(targets)}
        fields.update({name: dict(value) for name in ("rank_pattern", "alpha_pattern") if (value := getattr(config, name))})
        return fields

    def export_lora(self, store: VersionStore, version_id: str, path: str | Path) -> Path:
        """A version as this family's diffusers LoRA file (what its pipeline's ``load_lora_weights`` reads)."""
        return store.export_diffusers_lora(version_id, path, self.adapter_config(), pipeline_class=type(self.pipeline).__name__,
                                           component=self.denoiser_name)

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the same denoiser with its LoRA adapters disabled."""
        self.denoiser.disable_adapters()
        try:
            yield self
        finally:
            self.denoiser.enable_adapters()

    @contextlib.contextmanager
    def training(self):
        """The span of an update: gradient checkpointing on the denoiser when ``gradient_checkpointing`` is set.

        diffusers checkpoints its blocks whenever gradients are enabled, whatever ``train()`` says, so
        the denoiser stays in eval mode (no dropout anywhere) and passes under ``no_grad`` (the reference,
        the trust region) are unaffected. The previous setting comes back afterwards.
        """
        was = self.denoiser.is_gradient_checkpointing
        if self.gradient_checkpointing and not was:
            self.denoiser.enable_gradient_checkpointing()
        try:
            yield self
        finally:
            if not was and self.denoiser.is_gradient_checkpointing:
                self.denoiser.disable_gradient_checkpointing()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.denoiser.named_parameters() if "lora_" in name]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.denoiser).items()}

    def load_lora_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.denoiser, {k: v.to(self.device) for k, v in weights.items()})
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"adapter weights do not fit this model: unexpected keys such as {unexpected[0]}")

    def save_version(self, store: VersionStore, algorithm: str | None = None, metrics: dict | None = None) -> Version:
        """Save the current adapter weights as a new version (made current) and switch to it."""
        version = store.save(self.lora_state_dict(), parent=self.version, algorithm=algorithm,
                             base_model=str(self.model_path), metrics=metrics, base_fingerprint=self.base_fingerprint)
        self.version = version.id
        return version

    def use_version(self, store: VersionStore, version_id: str) -> Version:
        """Load the weights of ``version_id`` into the denoiser's adapters."""
        from optim.generators.base import ModelLoadError

        version = store.get(version_id)
        if version.base_fingerprint is None and version.base_model != str(self.model_path):  # saved before fingerprints
            raise ModelLoadError(f"version {version_id} was trained on {version.base_model}, not on the loaded model "
                                 f"{self.model_path}")
        if version.base_fingerprint not in (None, self.base_fingerprint):
            raise ModelLoadError(
                f"version {version_id} was trained on other weights than the loaded model's: {version.base_model} "
                f"(files {version.base_fingerprint}) against {self.model_path} (files {self.base_fingerprint}); load "
                f"the model it was trained on, or start a new --workdir")
        self._check_same_start(store)
        self.load_lora_state_dict(store.weights(version_id))
        self.version = version.id
        return version

    @functools.cached_property
    def base_fingerprint(self) -> str:
        """The loaded model folder's ``model_fingerprint``: what a version names as its base, wherever it lies."""
        return model_fingerprint(self.model_path)

    def open_versions(self, store: VersionStore) -> Version:
        """Load the store's current version, creating ``v0`` in an empty store: the base model, or base + the
        LoRA file the policy started from (recorded in its metrics as ``initial_lora``)."""
        if store.current is None:
            return self.save_version(store, algorithm=None, metrics={"initial_lora": self.initial_lora} if self.initial_lora else {})
        return self.use_version(store, store.current)

    def _check_same_start(self, store: VersionStore) -> None:
        """A store's versions fit only adapters shaped like its first version's: refuse another starting LoRA."""
        from optim.generators.base import ModelLoadError

        started = store.list()[0].metrics.get("initial_lora")
        if (started or {}).get("sha256") != (self.initial_lora or {}).get("sha256"):
            def describe(lora):
                return f"the LoRA file {lora['file']}" if lora else "the base model (no LoRA file)"

            hint = f"--lora {started['file']}" if started else "no --lora"
            raise ModelLoadError(f"the versions in {store.root} start from {describe(started)}, but this model starts from "
                                 f"{describe(self.initial_lora)}: start with {hint}, or use another work directory")

"""Model versions: LoRA adapter weights in safetensors with JSON metadata, and which one is current.

Layout under the store's root::

    v0/adapter.safetensors   v0/meta.json     (v0: the base model, adapters at zero)
    v1/...                                    (one folder per update)
    CURRENT                                   (the id the next round samples from)

A version is written into a temporary folder (``.staging-*``) and renamed into place, and
``CURRENT`` is replaced atomically, so a crash mid-update leaves the last good version current.
What a kill can leave (a staging folder; a newest version that never became current) is for the
owner to clear at start-up: ``remove_staging`` and ``set_aside``. Versions are never
pickles: ``safetensors`` holds only tensors, so loading a version cannot run code.

A version travels as a diffusers LoRA file (``export_diffusers_lora``): the same tensors with keys
prefixed ``unet.`` (``transformer.`` for SD 3 and FLUX) and the adapter's rank, alpha and target layers
in the file's metadata, which is what the pipeline's ``load_lora_weights`` reads (a file without the
prefix loads nothing).

A version names the base model it was trained on by the folder's path and by a fingerprint of its files
(``model_fingerprint``), so that a workdir still opens when the checkout or the model folder moves, and a
version is never loaded onto other weights that happen to sit at the same path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class UnknownVersion(KeyError):
    """A version id the store does not hold. Its text is the message alone (a plain KeyError's is the quoted
    repr), so the page, the API and the command line can show it as it is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown version"


@dataclass
class Version:
    id: str
    parent: str | None
    created: str
    algorithm: str | None
    base_model: str
    metrics: dict = field(default_factory=dict)
    base_fingerprint: str | None = None  # ``model_fingerprint`` of the base model's folder; None in older versions


#: The files of a diffusers folder that decide what the model computes: weights, configs, tokenizers.
FINGERPRINTED = (".safetensors", ".json", ".txt", ".model")
_SAMPLED_BYTES = 1 << 20


def model_fingerprint(folder: str | Path) -> str:
    """A short hash of a model folder's files, the same wherever the folder lies: each file's relative path and
    size, and its bytes (of a file over 2 MiB, the first and last MiB: a weights file's header, and data that
    differs between two checkpoints of one architecture). It reads at most 2 MiB a file, not the gigabytes of an
    SDXL or FLUX checkpoint."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FINGERPRINTED
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as file:
            if size <= 2 * _SAMPLED_BYTES:
                digest.update(file.read())
            else:
                digest.update(file.read(_SAMPLED_BYTES))
                file.seek(-_SAMPLED_BYTES, os.SEEK_END)
                digest.update(file.read(_SAMPLED_BYTES))
    return digest.hexdigest()[:16]


def cpu_fp32(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights as they are saved and compared, whatever the model's device and dtype: detached,
    on the CPU, fp32, contiguous (a version, an offline checkpoint, a replica's digest)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}


class VersionStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[Version]:
        """All versions, oldest first."""
        ids = [p.name for p in self.root.iterdir() if re.fullmatch(r"v\d+", p.name) and (p / "meta.json").exists()]
        return [self.get(i) for i in sorted(ids, key=lambda i: int(i[1:]))]

    def get(self, version_id: str) -> Version:
        meta = self.root / version_id / "meta.json"
        if not re.fullmatch(r"v\d+", version_id or "") or not meta.exists():
            known = ", ".join(v.id for v in self.list()) or "none"
            raise UnknownVersion(f"unknown version {version_id!r}; known versions: {known}")
        return Version(**json.loads(meta.read_text()))

    def weights(self, version_id: str) -> dict[str, torch.Tensor]:
        self.get(version_id)
        return load_file(self.root / version_id / "adapter.safetensors")

    def save(self, weights: dict[str, torch.Tensor], *, parent, algorithm, base_model, metrics=None,
             base_fingerprint: str | None = None) -> Version:
        """Write a new version atomically and make it current."""
        existing = [int(v.id[1:]) for v in self.list()]
        version = Version(
            id=f"v{max(existing) + 1 if existing else 0}",
            parent=parent,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            algorithm=algorithm,
            base_model=base_model,
            metrics=dict(metrics or {}),
            base_fingerprint=base_fingerprint,
        )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            save_file(cpu_fp32(weights), staging / "adapter.safetensors")
            (staging / "meta.json").write_text(json.dumps(asdict(version), indent=2))
            os.rename(staging, self.root / version.id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.set_current(version.id)
        return version

    def export_diffusers_lora(self, version_id: str, path: str | Path, adapter_config: dict,
                              pipeline_class: str = "StableDiffusionPipeline", component: str = "unet") -> Path:
        """Write ``version_id`` as a diffusers LoRA file at ``path`` (a ``.safetensors`` file), atomically.

        ``adapter_config``: the adapter's ``LoraConfig`` fields (``Policy.adapter_config()``); diffusers
        would otherwise take alpha = rank, and the scaling alpha / rank would differ for any other alpha.
        Written by diffusers' own ``save_lora_weights`` of ``pipeline_class`` for its ``component`` ("unet"
        for SD and SDXL, "transformer" for SD 3 and FLUX: ``Policy.export_lora`` passes the family's), so
        the format is the one that pipeline's ``load_lora_weights`` reads.
        """
        import diffusers

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"a diffusers LoRA file ends in .safetensors, got {path.name}")
        weights = {k: v.contiguous() for k, v in self.weights(version_id).items()}
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            getattr(diffusers, pipeline_class).save_lora_weights(
                staging, weight_name=path.name, **{f"{component}_lora_layers": weights,
                                                   f"{component}_lora_adapter_metadata": dict(adapter_config)})
            os.replace(staging / path.name, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def remove_staging(self) -> list[Path]:
        """Remove the staging folders of versions that were being written when a process was killed;
        returns them. Only at start-up: a running save owns its staging folder."""
        leftovers = sorted(p for p in self.root.glob(".staging-*") if p.is_dir())
        for folder in leftovers:
            shutil.rmtree(folder)
        return leftovers

    def set_aside(self, version_id: str) -> Path:
        """Move a version's folder out of the list, to ``.set-aside-<id>-<time>`` (kept for inspection);
        returns where. The current version is refused."""
        self.get(version_id)
        if version_id == self.current:
            raise ValueError(f"version {version_id} is current: roll back first")
        target = self.root / f".set-aside-{version_id}-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(self.root / version_id, target)
        return target

    @property
    def current(self) -> str | None:
        marker = self.root / "CURRENT"
        return marker.read_text().strip() if marker.exists() else None

    def set_current(self, version_id: str) -> Version:
        """Make ``version_id`` the one the next round samples from (also how rollback works)."""
        version = self.get(version_id)
        marker = self.root / ".CURRENT.tmp"
        marker.write_text(version_id)
        os.replace(marker, self.root / "CURRENT")
        return version

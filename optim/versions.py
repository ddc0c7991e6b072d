"""Model versions: LoRA adapter weights in safetensors with JSON metadata, and which one is current.

Layout under the store's root::

    v0/adapter.safetensors   v0/meta.json     (v0: the base model, adapters at zero)
    v1/...                                    (one folder per update)
    CURRENT                                   (the id the next round samples from)

A version is written into a temporary folder and renamed into place, and ``CURRENT`` is replaced
atomically, so a crash mid-update leaves the last good version current. Versions are never
pickles: ``safetensors`` holds only tensors, so loading a version cannot run code.
"""

from __future__ import annotations

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


@dataclass
class Version:
    id: str
    parent: str | None
    created: str
    algorithm: str | None
    base_model: str
    metrics: dict = field(default_factory=dict)


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
            raise KeyError(f"unknown version {version_id!r}; known versions: {known}")
        return Version(**json.loads(meta.read_text()))

    def weights(self, version_id: str) -> dict[str, torch.Tensor]:
        self.get(version_id)
        return load_file(self.root / version_id / "adapter.safetensors")

    def save(self, weights: dict[str, torch.Tensor], *, parent, algorithm, base_model, metrics=None) -> Version:
        """Write a new version atomically and make it current."""
        existing = [int(v.id[1:]) for v in self.list()]
        version = Version(
            id=f"v{max(existing) + 1 if existing else 0}",
            parent=parent,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            algorithm=algorithm,
            base_model=base_model,
            metrics=dict(metrics or {}),
        )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
            save_file(tensors, staging / "adapter.safetensors")
            (staging / "meta.json").write_text(json.dumps(asdict(version), indent=2))
            os.rename(staging, self.root / version.id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.set_current(version.id)
        return version

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

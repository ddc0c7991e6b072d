"""The control room: one round is generate -> reject -> rank -> losses -> update, and everything is stored.

``ControlRoom`` joins the pieces: the policy (generator with LoRA versions), the selector and the
rejection sampler, the store (groups, candidates, rankings, updates), the optimisers and the
exports. The page (``workbench/ui.py``) and the HTTP API are thin layers over these methods.

- Work on the one model (generate, sample, update, rollback) is serialised by a lock: browser
  sessions share one GPU. Ranking, losses of stored numbers, browsing and exports only touch the
  store and never wait for it.
- A group is stored with its candidates' images, verdicts and chains before ``generate`` returns,
  so a restart loses nothing; a ranking is stored before ``rank`` returns.
- Candidates are handed out blind: ids and images, with the selector's scores only for the page's
  rejected list. The survivors' order is the drawing order; the page shuffles what it shows.
"""

from __future__ import annotations

import contextlib
import io
import secrets
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from PIL import Image

from data.export import CandidateRecord, RankedGroupRecord, RankingRecord, RatingRecord, export
from data.modalities import modality_of_prompt
from data.store import NewCandidate, Store, StoreError
from optim.groups import RankedGroup
from optim.losses import group_losses
from optim.policy import Policy
from optim.rewards import validate_ranking
from optim.selector import Selector
from optim.trajectory import Trajectory
from optim.update import UpdateConfig, UpdateResult, apply_update
from optim.versions import VersionStore
from workbench.sampler import RejectionSampler, SamplerConfig


@dataclass
class RoomConfig:
    survivors: int = 4  # candidates an expert ranks
    batch_size: int = 4
    max_draws: int = 16  # the rejection sampler's budget per group
    steps: int = 20
    guidance: float = 5.0
    eta: float = 1.0
    wanted_rankings: int = 1  # 2 sends every group to two experts (agreement)
    update: UpdateConfig = field(default_factory=UpdateConfig)


@dataclass
class RoomCandidate:
    id: str
    image: Image.Image
    scores: dict  # quality and modality probabilities, from the selector
    reasons: list[str]  # empty for survivors


@dataclass
class RoomGroup:
    id: str
    prompt: str
    version: str
    survivors: list[RoomCandidate]
    rejected: list[RoomCandidate]
    message: str  # the sampler's sentence: how many passed, from how many draws


class ControlRoom:
    def __init__(self, model: str | Path | None = None, workdir: str | Path = "runs/demo", selector: str | Path | None = None,
                 config: RoomConfig | None = None, store_url: str | None = None, auto_register: bool = True):
        """``auto_register``: an unknown expert name is added at level 1 when it first ranks (local,
        single-user mode); with logins configured the page turns it off and experts are added by an admin."""
        self.auto_register = auto_register
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config or RoomConfig()
        self.policy = Policy.load(model)
        self.version_store = VersionStore(self.workdir / "versions")
        self.store = Store(self.workdir, store_url)
        self.sampler = RejectionSampler(self.policy, Selector.load(selector), SamplerConfig(
            self.config.survivors, self.config.batch_size, self.config.max_draws))
        self.model_lock = threading.Lock()
        with self.model_lock:
            current = self.policy.open_versions(self.version_store)
        if not any(v["id"] == current.id for v in self.store.versions()):
            self.store.record_version(current.id, current.parent, current.algorithm, current.metrics)

    # ------------------------------------------------------------------ a round

    def generate(self, prompt: str, n: int | None = None, seed: int = 0) -> RoomGroup:
        """Draw until ``n`` candidates pass the selector (or the budget is spent); store the group."""
        c = self.config
        with self.model_lock:
            result = self.sampler.draw(prompt, seed, n, steps=c.steps, guidance=c.guidance, eta=c.eta)
            version = self.policy.version
        chains = result.trajectory
        stored = [NewCandidate(_png(k.image), True, k.seed, k.verdict.quality, k.verdict.modality_probabilities,
                               [], chains.select([i]).to_bytes()) for i, k in enumerate(result.survivors)]
        stored += [NewCandidate(_png(k.image), False, k.seed, k.verdict.quality, k.verdict.modality_probabilities,
                                k.verdict.reasons) for k in result.rejected]
        group_id = self.store.add_group(prompt, version, [k.seed for k in result.survivors + result.rejected],
                                        {"steps": c.steps, "guidance": c.guidance, "eta": c.eta}, stored, c.wanted_rankings)
        return self._room_group(self.store.get_group(group_id), result.message())

    def rank(self, group_id: str, tiers: list, expert: str, ratings: dict | None = None, skipped: bool = False,
             seconds: float | None = None) -> dict:
        """Store one expert's ranking (tiers best first, a tier holds ties) or skip of a group."""
        if not skipped:
            tiers = validate_ranking(tiers, self.store.get_group(group_id)["survivors"])
        if self.auto_register:
            try:
                self.store.get_expert(expert)
            except StoreError:
                with contextlib.suppress(StoreError):  # another session may have added the name just now
                    self.store.add_expert(expert)
        return self.store.add_ranking(group_id, expert, None if skipped else tiers, ratings=ratings, skipped=skipped,
                                      seconds=seconds)

    def losses(self, group_id: str) -> dict:
        """GRPO and DPO numbers for a group under the current weights (ratio 1 while unchanged)."""
        with self.model_lock:
            return group_losses(self.policy, self._ranked_group(group_id), self.config.update)

    def apply_update(self, algorithm: str = "grpo", who: str = "admin", group_ids: list[str] | None = None) -> UpdateResult:
        """Train on the given groups, or on every ranked group no update has used yet; a new version or a refusal."""
        ids = group_ids if group_ids is not None else [g["id"] for g in self.store.unused_ranked_groups()]
        if not ids:
            raise ValueError("no ranked groups to learn from yet: rank a group first")
        groups = [self._ranked_group(g) for g in ids]
        with self.model_lock:
            result = apply_update(self.policy, self.version_store, groups, replace(self.config.update, algorithm=algorithm))
        if result.applied:
            v = result.version
            self.store.record_version(v.id, v.parent, v.algorithm, v.metrics)
        self.store.record_update(who, algorithm, ids, result.applied, result.version.id if result.applied else None,
                                 result.message, result.metrics)
        return result

    def sample(self, prompt: str, n: int = 4, seed: int = 0, version: str | None = None) -> list[Image.Image]:
        """Plain samples (no selector) from any version, the current one by default; the current stays current."""
        c = self.config
        settings = dict(n=n, seed=seed, steps=c.steps, guidance=c.guidance, eta=c.eta)
        with self.model_lock:
            current = self.policy.version
            if version is None or version == current:
                return self.policy.sample(prompt, **settings).images
            weights = self.policy.lora_state_dict()
            try:
                self.policy.use_version(self.version_store, version)
                return self.policy.sample(prompt, **settings).images
            finally:
                self.policy.load_lora_state_dict(weights)
                self.policy.version = current

    def versions(self) -> list[dict]:
        current = self.version_store.current
        return [{"id": v.id, "parent": v.parent, "created": v.created, "algorithm": v.algorithm, "metrics": v.metrics,
                 "current": v.id == current} for v in self.version_store.list()]

    def rollback(self, version_id: str) -> dict:
        """Make an earlier version current: the next round samples from it."""
        with self.model_lock:
            self.policy.use_version(self.version_store, version_id)
            self.version_store.set_current(version_id)
        return next(v for v in self.versions() if v["id"] == version_id)

    def export(self, kind: str, path: str | Path) -> Path:
        """Every ranked group as a preference dataset (``data.export`` kinds), experts pseudonymised."""
        return export(kind, self._records(), path, secret=self._secret())

    # ------------------------------------------------------------------ helpers

    def _ranked_group(self, group_id: str) -> RankedGroup:
        group = self.store.get_group(group_id)
        survivors = [c for c in group["candidates"] if c["passed"]]
        if not survivors:
            raise ValueError(f"group {group_id} has no candidate that passed the selector: nothing to rank or learn from")
        chains = Trajectory.join([Trajectory.from_bytes(self.store.blobs.get(c["trajectory"])) for c in survivors])
        rankings = [(r["tiers"], r["level"]) for r in self.store.rankings(group_id) if not r["skipped"]]
        return RankedGroup(group_id, [c["id"] for c in survivors], chains, rankings)

    def _room_group(self, group: dict, message: str) -> RoomGroup:
        def candidate(c: dict) -> RoomCandidate:
            image = Image.open(io.BytesIO(self.store.blobs.get(c["image"])))
            return RoomCandidate(c["id"], image, {"quality": c["quality"], **c["modality"]}, c["reasons"])

        return RoomGroup(group["id"], group["prompt"], group["version"],
                         [candidate(c) for c in group["candidates"] if c["passed"]],
                         [candidate(c) for c in group["candidates"] if not c["passed"]], message)

    def _records(self) -> list[RankedGroupRecord]:
        records = []
        for group_id in {r["group_id"] for r in self.store.rankings() if not r["skipped"]}:
            group = self.store.get_group(group_id)
            rankings = [r for r in self.store.rankings(group_id) if not r["skipped"]]
            records.append(RankedGroupRecord(
                group_id, group["prompt"],
                [CandidateRecord(c["id"], self.store.blobs.get(c["image"]), group["version"])
                 for c in group["candidates"] if c["passed"]],
                [RankingRecord(str(r["id"]), r["expert"], r["level"], r["tiers"], _when(r["created_at"])) for r in rankings],
                modality_of_prompt(group["prompt"]),
                tuple(RatingRecord(cid, r["expert"], r["level"], value)
                      for r in rankings for cid, value in (r["ratings"] or {}).items()),
            ))
        return sorted(records, key=lambda record: record.group_id)

    def _secret(self) -> str:
        """The installation's export key (pseudonyms, DICOM UIDs): made once, kept in the work directory."""
        path = self.workdir / "export.secret"
        if not path.exists():
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)

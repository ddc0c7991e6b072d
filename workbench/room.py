"""The control room: one round is generate -> reject -> rank -> losses -> update, and everything is stored.

``ControlRoom`` joins the pieces: the policy (generator with LoRA versions), the selector and the
rejection sampler, the store (groups, candidates, rankings, updates), the optimisers and the
exports. The page (``workbench/ui.py``) and the HTTP API are thin layers over these methods.

- Work on the one model (generate, sample, update, rollback) is serialised by a lock: browser
  sessions share one GPU. Ranking, losses of stored numbers, browsing and exports only touch the
  store and never wait for it.
- A group is stored with its candidates' images, verdicts and chains before ``generate`` returns,
  so a restart loses nothing; a ranking is stored before ``rank`` returns.
- The overlap share (a setting kept in the store) sends that share of new groups to two experts,
  spread evenly: group i wants two rankings when floor((i+1)s) > floor(is).
- Candidates are handed out blind: ids and images, with the selector's scores only for the page's
  rejected list. The survivors' order is the drawing order; the page shuffles what it shows.
"""

from __future__ import annotations

import io
import logging
import math
import os
import secrets
import shutil
import statistics
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from data.diversity import diversity, diversity_change, grey_levels
from data.export import ABJudgementRecord, CandidateRecord, RankedGroupRecord, RankingRecord, RatingRecord, export
from data.images import read_image, to_display, unit_to_pil
from data.modalities import modality_of_prompt
from data.ratings import RatingsConfig, read_ratings, unpack_ratings_archive
from data.store import NewCandidate, NewImportedRating, Store, StoreError
from optim.preference.agreement import agreement
from optim.preference.groups import AIRanking, RankedGroup
from optim.preference.losses import group_losses
from optim.policy import Policy
from optim.preference.reward_model import RewardModel, RewardModelConfig, confident_tiers, featurizer
from optim.preference.rewards import validate_ranking
from optim.selector.model import Selector
from optim.trajectory import Trajectory
from optim.preference.update import UpdateConfig, UpdateResult, apply_update
from optim.verification import summarize
from optim.versions import VersionStore
from workbench.ai_feedback import (AIGroup, AmplificationRefused, AmplifyConfig, draw_ai_groups, fit_reward_model,
                                   prompts_for_ai_groups, prompts_the_model_can_rank)
from workbench.sampler import RejectionSampler, SamplerConfig
from workbench.verification import BlindPair, draw_pair


AI_RANKER = "reward-model"  # the "expert" of AI-ranked rows in an export with include_ai
PROBE_SEED = 900_000  # the pass-rate check's fixed seeds

log = logging.getLogger(__name__)


@dataclass
class RoomConfig:
    survivors: int = 4  # candidates an expert ranks
    batch_size: int = 4
    max_draws: int = 16  # the rejection sampler's budget per group
    steps: int = 20
    guidance: float = 5.0
    eta: float = 1.0
    update: UpdateConfig = field(default_factory=UpdateConfig)
    amplify: AmplifyConfig = field(default_factory=AmplifyConfig)
    pass_rate_probe: int = 16  # candidates drawn on fixed seeds, over the update's prompts, to check it (0: no check)
    max_pass_rate_drop: float = 0.125  # trained weights passing the selector this much less than the base: refused
    # Trained weights whose probe candidates vary this share less than the base's are refused; None: reported only.
    # Off by default, measured: at 0.2 the 16-candidate probe read 28-29% where 64 evaluation samples read 8-17%,
    # refused updates that were fine, and the groups that piled up made worse ones (README, "collapse guard").
    max_diversity_drop: float | None = None


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
                 config: RoomConfig | None = None, store_url: str | None = None, auto_register: bool = True,
                 dtype: str | None = None, lora: str | Path | None = None, noise_level: float | None = None):
        """``auto_register``: an unknown expert name is added at level 1 when it first ranks (local,
        single-user mode); with logins configured the page turns it off and experts are added by an admin.
        ``noise_level``: a flow-matching model's SDE noise level (default 0.7; ``optim.generators.flow``)."""
        self.auto_register = auto_register
        self.workdir = Path(workdir)
        # The store and the selector before the model (minutes for SDXL or FLUX): a bad one fails fast.
        self.store = Store(self.workdir, store_url)
        self.config = config or RoomConfig()
        judge = Selector.load(selector)  # a folder, None (the embedded one) or "gates"
        options = {} if noise_level is None else {"noise_level": noise_level}
        self.policy = Policy.load(model, dtype=dtype, lora=lora, **options)  # dtype: bf16 | fp16 | fp32; lora: a diffusers LoRA to start from
        self.version_store = VersionStore(self.workdir / "versions")
        self.sampler = RejectionSampler(self.policy, judge, SamplerConfig(
            self.config.survivors, self.config.batch_size, self.config.max_draws))
        self.model_lock = threading.Lock()
        # The base model's verdicts and grey images on the probe's seeds never change: drawn once each.
        self._base_probe: dict[tuple[str, int, int], tuple[list[bool], list[np.ndarray]]] = {}
        self.imports = self.workdir / "imports"  # ratings zips unpack here; emptied at each start (a kill leaves files)
        shutil.rmtree(self.imports, ignore_errors=True)
        self.imports.mkdir()
        self._reconcile_versions()
        with self.model_lock:
            current = self.policy.open_versions(self.version_store)
        if not any(v["id"] == current.id for v in self.store.versions()):
            self.store.record_version(current.id, current.parent, current.algorithm, current.metrics)

    # ------------------------------------------------------------------ a round

    def generate(self, prompt: str, n: int | None = None, seed: int = 0,
                 on_batch: Callable[[int, int, int], None] | None = None) -> RoomGroup:
        """Draw until ``n`` candidates pass the selector (or the budget is spent); store the group.

        ``on_batch(drawn, kept, budget)`` reports progress after each batch (the page's progress bar).
        """
        c = self.config
        with self.model_lock:
            result = self.sampler.draw(prompt, seed, n, steps=c.steps, guidance=c.guidance, eta=c.eta, on_batch=on_batch)
            version = self.policy.version
        chains = result.trajectory
        stored = [NewCandidate(_png(k.image), True, k.seed, k.verdict.quality, k.verdict.modality_probabilities,
                               [], chains.select([i]).to_bytes()) for i, k in enumerate(result.survivors)]
        stored += [NewCandidate(_png(k.image), False, k.seed, k.verdict.quality, k.verdict.modality_probabilities,
                                k.verdict.reasons) for k in result.rejected]
        group_id = self.store.add_group(prompt, version, [k.seed for k in result.survivors + result.rejected],
                                        {"steps": c.steps, "guidance": c.guidance, "eta": c.eta}, stored,
                                        self._wanted_rankings())
        return self._room_group(self.store.get_group(group_id), result.message())

    def rank(self, group_id: str, tiers: list, expert: str, ratings: dict | None = None, skipped: bool = False,
             seconds: float | None = None, level: int | None = None) -> dict:
        """Store one expert's ranking (tiers best first, a tier holds ties) or skip of a group.

        ``level`` (1-3) weights the vote; by default the expert's level in the store. In local mode
        (``auto_register``) an unknown name is added at that level.
        """
        self._register(expert, level)
        return self.store.add_ranking(group_id, expert, None if skipped else tiers, level=level, ratings=ratings,
                                      skipped=skipped, seconds=seconds,
                                      check_tiers=lambda survivors: validate_ranking(tiers, survivors))

    def losses(self, group_id: str) -> dict:
        """GRPO and DPO numbers for a group under the current weights (ratio 1 while unchanged)."""
        with self.model_lock:
            return group_losses(self.policy, self._ranked_group(group_id), self.config.update)

    def apply_update(self, algorithm: str = "grpo", who: str = "admin", group_ids: list[str] | None = None,
                     config: UpdateConfig | None = None, ai_groups: int | None = None, ai_weight: float | None = None,
                     prompts: list[str] | None = None, on_progress: Callable[[float, str], None] | None = None) -> UpdateResult:
        """Train on the given groups, or on every ranked group no update has used yet; a new version or a refusal.

        ``config`` replaces the room's update settings for this update only (the page's learning rate, steps...).
        The reward model is refitted on every stored ranking first (its held-out accuracy goes into the
        metrics, and it is saved beside the new version); ``ai_groups`` (default: the room's setting) adds that
        many groups it ranks, drawn for the ranked prompts and ``prompts``, those trained on least first
        (``workbench.ai_feedback``), each weighing ``ai_weight`` (default: the room's setting).
        ``on_progress(fraction, what)`` reports each stage (the page's progress bar).
        """
        ids = group_ids if group_ids is not None else [g["id"] for g in self.store.unused_ranked_groups()]
        if not ids:
            raise ValueError("no ranked groups to learn from yet: rank a group first")
        groups = [self._ranked_group(g) for g in ids]
        config = config or self.config.update
        config = replace(config, algorithm=algorithm, seed=secrets.randbits(31) if config.seed is None else config.seed)
        this_update = {"ai_groups": ai_groups, "ai_weight": ai_weight}
        amplify = replace(self.config.amplify, **{name: value for name, value in this_update.items() if value is not None})
        progress = on_progress or (lambda fraction, what: None)
        with self.model_lock:
            progress(0.0, "fitting the reward model on the experts' rankings")
            reward_model = fit_reward_model(self.store, self._featurizers(amplify.reward_model), amplify)
            extra = {"reward_model": reward_model.metrics if reward_model else None, "ai_groups_skipped": 0,
                     "ai_groups_left_out": {}, "ai_weight": amplify.ai_weight,
                     "who": who}  # in the version's meta.json: a kill before record_update is put right at start-up
            try:
                if amplify.ai_groups:
                    if reward_model is None:
                        raise AmplificationRefused(f"the reward model needs at least {amplify.min_ranked_groups} ranked "
                                                   "groups before it can rank AI groups")
                    ranked_prompts, extra["ai_groups_left_out"] = prompts_the_model_can_rank(
                        prompts_for_ai_groups([g.trajectory.prompt for g in groups], prompts or [],
                                              self.store.ranked_prompts_trained()),
                        reward_model.metrics["heldout_by_modality"], amplify.min_modality_accuracy)
                    if not ranked_prompts:
                        raise AmplificationRefused("the reward model has not shown on held-out groups that it ranks "
                                                   "these prompts' modalities as the experts do ("
                                                   f"{'; '.join(extra['ai_groups_left_out'].values())}): rank more "
                                                   "groups by hand, or ask for no AI groups")
                    progress(0.05, f"drawing {amplify.ai_groups} groups for the reward model to rank")
                    drawn, extra["ai_groups_skipped"] = draw_ai_groups(
                        self.sampler, reward_model, ranked_prompts, amplify, self._sampling(), config.seed,
                        lambda done, total: progress(0.05 + 0.35 * done / total, f"AI-ranked group {done} of {total}"))
                    groups += [self._store_ai_group(d, reward_model, amplify.ai_weight) for d in drawn]
            except AmplificationRefused as refusal:
                result = UpdateResult(False, None, extra, f"update refused: {refusal}; {self.policy.version} stays current")
            else:
                accept = self._probe_check(groups, progress, extra)
                progress(0.4, f"training: {algorithm.upper()} on {len(groups)} groups")
                result = apply_update(self.policy, self.version_store, groups, config, extra_metrics=extra, accept=accept,
                                      on_step=lambda done, total: progress(0.4 + 0.55 * done / total,
                                                                           f"optimizer step {done} of {total}"))
                if extra["ai_groups_left_out"]:  # say so: the admin asked for AI groups on every ranked prompt
                    result = replace(result, message=f"{result.message}; no AI groups for "
                                                     + "; ".join(extra["ai_groups_left_out"].values()))
            if result.applied and reward_model is not None:
                reward_model.save(self.workdir / "reward_models" / result.version.id, reward_model.seen)
        if result.applied:
            v = result.version
            self.store.record_version(v.id, v.parent, v.algorithm, v.metrics)
        used = [g.id for g in groups]
        self.store.record_update(who, algorithm, used, result.applied, result.version.id if result.applied else None,
                                 result.message, result.metrics)
        progress(1.0, result.message)
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

    def export(self, kind: str, path: str | Path, dicom: bool = False, include_ai: bool = False) -> Path:
        """Every ranked group as a preference dataset (``data.export`` kinds), or every blind A/B
        judgement (kind ``ab``), experts pseudonymised; ``dicom`` adds de-identified DICOM copies to
        the ratings_csv zip. Groups the reward model ranked join only with ``include_ai``, as rows
        whose ``source`` is "ai": never mistaken for human preferences."""
        records = self._ab_records() if kind == "ab" else self._records() + (self._ai_records() if include_ai else [])
        return export(kind, records, path, secret=self._secret(), dicom=dicom)

    # ------------------------------------------------------------------ blind A/B verification

    def ab_pair(self, expert: str, version_a: str | None = None, version_b: str | None = None,
                prompt: str | None = None, seed: int | None = None, level: int | None = None) -> BlindPair:
        """One image from each of two versions, same prompt and seed, on random hidden sides
        (``workbench.verification``); by default the current version against its parent."""
        self._register(expert, level)
        return draw_pair(self, expert, version_a, version_b, prompt, seed)

    def ab_judge(self, pair_id: str, expert: str, choice: str, seconds: float | None = None,
                 level: int | None = None) -> dict:
        """Store the expert's answer to their pair: "left", "right" or "same"; the store keeps the
        winning version. A pair is judged once, and only by the expert it was shown to."""
        return self.store.judge_ab_pair(pair_id, expert, choice, level=level, seconds=seconds)

    def ab_results(self) -> list[dict]:
        """Per version pair (older ``version_a``, newer ``version_b``): the newer version's wins, "same"
        answers and losses, its win-rate ("same" as half a win) and Wilson 95% interval, overall, per
        expert and per modality (``optim.verification.summarize``)."""
        return summarize(self.store.ab_judgements())

    # ------------------------------------------------------------------ browsing, data and settings

    def group(self, group_id: str) -> RoomGroup:
        return self._room_group(self.store.get_group(group_id), "")

    def next_group(self, expert: str) -> RoomGroup | None:
        """The oldest stored group still waiting for a ranking that this expert has not answered."""
        group = self.store.next_group_for(expert)
        return None if group is None else self._room_group(group, "a stored group waiting for a ranking")

    def enroll(self, name: str, role: str = "expert", level: int = 1) -> dict:
        """Add an expert, or update their role and level (from the accounts file)."""
        return self.store.set_expert(name, role, level)

    def updates(self) -> list[dict]:
        return self.store.updates()

    def counts(self) -> dict:
        return self.store.counts()

    def agreement(self) -> list[dict]:
        """Kendall tau-b per pair of experts over the groups both ranked."""
        return agreement(self.store.rankings())

    def history(self) -> list[dict]:
        """One row per version, oldest first, for the page's plots: the update's last loss and KL from
        its parent, and what experts (rating, scaled to 0-1) and the selector (quality) gave its groups."""
        summary = self.store.version_summary()
        rows = []
        for number, v in enumerate(self.store.versions()):
            scores = summary.get(v["id"], {})
            rating = scores.get("rating")
            rows.append({"version": number, "id": v["id"], "loss": v["metrics"].get("loss_last"),
                         "kl": v["metrics"].get("kl_from_previous"), "quality": scores.get("quality"),
                         "rating": None if rating is None else RatingsConfig().normalise(rating)})
        return rows

    def experts(self) -> list[dict]:
        """Per expert: level, rankings, skips and median seconds per ranking."""
        rows: dict[str, dict] = {}
        for r in self.store.rankings():
            row = rows.setdefault(r["expert"], {"expert": r["expert"], "level": r["level"], "rankings": 0,
                                                "skipped": 0, "seconds": []})
            row["skipped" if r["skipped"] else "rankings"] += 1
            row["level"] = r["level"]  # the latest
            if r["seconds"] is not None:
                row["seconds"].append(r["seconds"])
        for row in rows.values():
            row["median_seconds"] = statistics.median(row.pop("seconds")) if row["seconds"] else None
        return sorted(rows.values(), key=lambda row: row["expert"])

    @property
    def overlap(self) -> float:
        """The share of new groups sent to two experts (0 to 1)."""
        return float(self.store.get_setting("overlap", 0.0))

    def set_overlap(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"overlap is a share of groups between 0 and 1, not {share}")
        self.store.set_setting("overlap", float(share))

    def import_ratings(self, path: str | Path, imported_by: str) -> dict:
        """Import a ratings CSV (its images beside it) or a zip of one: good rows are stored, every bad
        row is reported by number and column. Images are stored as the PNG the expert saw."""
        path = Path(path)
        with tempfile.TemporaryDirectory(dir=self.imports) as folder:  # removed after an error too
            csv_path = unpack_ratings_archive(path, folder) if path.suffix.lower() == ".zip" else path
            ratings = read_ratings(csv_path)
            rows = [NewImportedRating(_png(unit_to_pil(to_display(read_image(row.path)))), row.rating, row.modality,
                                      row.expert_level, row.prompt, f"{path.name} row {row.row}")
                    for row in ratings.rows.itertuples()]
        stored = self.store.add_imported_ratings(rows, imported_by)
        return {"imported": stored, "rejected_rows": len({e.row for e in ratings.errors}),
                "errors": [str(e) for e in ratings.errors], "report": ratings.report()}

    # ------------------------------------------------------------------ helpers

    def _register(self, expert: str, level: int | None) -> None:
        """In local mode (``auto_register``) an expert unknown to the store is added at ``level`` (1 if none)."""
        if self.auto_register:
            try:
                self.store.get_expert(expert)
            except StoreError:
                self.store.set_expert(expert, level=level or 1)

    def _sampling(self) -> dict:
        c = self.config
        return {"steps": c.steps, "guidance": c.guidance, "eta": c.eta}

    def _featurizers(self, config: RewardModelConfig) -> list:
        """The reward model's featurizers over this room's generator and selector, one per feature set it may use."""
        return [featurizer(name, policy=self.policy, selector=self.sampler.selector) for name in config.feature_choices()]

    def _store_ai_group(self, drawn: AIGroup, reward_model: RewardModel, weight: float) -> RankedGroup:
        """Store a group the reward model ranked (source "ai", its scores kept) and return it for training."""
        result = drawn.draw
        ai = {"scores": drawn.scores, "tiers": drawn.tiers, "agreement": drawn.agreement, "reward_model": reward_model.metrics,
              "weight": weight}
        candidates = [NewCandidate(_png(k.image), True, k.seed, k.verdict.quality, k.verdict.modality_probabilities, [],
                                   result.trajectory.select([i]).to_bytes()) for i, k in enumerate(result.survivors)]
        group_id = self.store.add_group(result.prompt, self.policy.version, [k.seed for k in result.survivors],
                                        {**self._sampling(), "seed": drawn.seed}, candidates, ai=ai)
        ids = [c["id"] for c in self.store.get_group(group_id)["candidates"]]
        return RankedGroup(group_id, ids, result.trajectory, ai=AIRanking(drawn.scores, drawn.agreement, weight, drawn.tiers))

    def _probe_check(self, groups: list[RankedGroup], progress: Callable[[float, str], None], metrics: dict):
        """A check for ``apply_update`` (the reward-hacking guards): on ``pass_rate_probe`` fixed seeds spread
        over the update's prompts (up to 8), the trained weights' candidates are compared with the base model's
        (adapters off). Refused when the selector passes more than ``max_pass_rate_drop`` fewer of them, or, when
        ``max_diversity_drop`` is set, when they vary that much less from one another (``data.diversity``: the
        images of a prompt growing alike). The four figures go into ``metrics["probe"]`` either way.

        Against the base, not the current version: a run of updates that each spoil a little is caught
        when the sum crosses the bar (a brightness expert's GRPO run once lost every CT candidate in four
        updates that each passed a check against the version before).
        """
        count = self.config.pass_rate_probe
        if not count:
            return None
        prompts = list(dict.fromkeys(g.trajectory.prompt for g in groups))[:8]
        shares = [count // len(prompts) + (k < count % len(prompts)) for k in range(len(prompts))]

        def draw(prompt: str, n: int, seed: int) -> tuple[list[bool], list[np.ndarray]]:
            images = self.policy.sample(prompt, n=n, seed=seed, **self._sampling()).images
            return [v.passed for v in self.sampler.selector.judge(images, prompt=prompt)], [grey_levels(im) for im in images]

        probes = [(prompt, n, PROBE_SEED + k) for k, (prompt, n) in enumerate(zip(prompts, shares)) if n]
        if any(probe not in self._base_probe for probe in probes):
            progress(0.4, "the base model's candidates on fixed seeds, for the checks (once per prompt)")
        with self.policy.reference():  # drawn once per probe: the base model, seeds and selector stay the same
            for probe in probes:
                if probe not in self._base_probe:
                    self._base_probe[probe] = draw(*probe)
        base = [self._base_probe[probe] for probe in probes]

        def accept() -> str | None:
            progress(0.95, "checking the trained weights' pass rate and variety on fixed seeds")
            after = [draw(*probe) for probe in probes]
            figures = {"candidates": count}
            for name, drawn in (("base", base), ("trained", after)):
                passed = [p for verdicts, _ in drawn for p in verdicts]
                figures[f"pass_rate_{name}"] = sum(passed) / len(passed)
                variety = diversity([greys for _, greys in drawn])  # nan when no prompt has two candidates
                figures[f"diversity_{name}"] = None if math.isnan(variety) else variety
            metrics["probe"] = figures
            if figures["pass_rate_base"] - figures["pass_rate_trained"] > self.config.max_pass_rate_drop:
                return (f"the selector passes {figures['pass_rate_trained']:.0%} of {count} candidates on fixed seeds where "
                        f"the base model passes {figures['pass_rate_base']:.0%} (more than "
                        f"{self.config.max_pass_rate_drop:.0%} fewer): the update would spoil the images")
            limit = self.config.max_diversity_drop  # None: the guard is off
            change = diversity_change(figures["diversity_base"], figures["diversity_trained"])  # None: nothing to compare
            if limit is not None and change is not None and -change > limit:
                return (f"the candidates of a prompt on fixed seeds differ {-change:.0%} less from one another than the base "
                        f"model's (more than {limit:.0%} less): the update would make the images alike "
                        "(a lower learning rate or fewer passes moves them less)")
            return None

        return accept

    def _wanted_rankings(self) -> int:
        share, made = self.overlap, self.store.group_count()
        return 2 if math.floor((made + 1) * share) > math.floor(made * share) else 1

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
        for group in self.store.groups_with_rankings():  # a fixed number of queries, however many groups
            rankings = group["rankings"]
            records.append(RankedGroupRecord(
                group["id"], group["prompt"],
                [CandidateRecord(c["id"], self.store.blobs.get(c["image"]), group["version"])
                 for c in group["passed_candidates"]],
                [RankingRecord(str(r["id"]), r["expert"], r["level"], r["tiers"], _when(r["created_at"])) for r in rankings],
                modality_of_prompt(group["prompt"], known=None),  # any prefix: a host's own modalities too
                tuple(RatingRecord(cid, r["expert"], r["level"], value)
                      for r in rankings for cid, value in (r["ratings"] or {}).items()),
            ))
        for row in self.store.imported_ratings():
            candidate = f"import-{row['id']}"
            records.append(RankedGroupRecord(
                candidate, row["prompt"], [CandidateRecord(candidate, self.store.blobs.get(row["image"]), "imported")], [],
                row["modality"], (RatingRecord(candidate, row["imported_by"], row["level"], _number(row["rating"])),)))
        return sorted(records, key=lambda record: record.group_id)

    def _ai_records(self) -> list[RankedGroupRecord]:
        """The reward model's groups as rankings by "reward-model" (level 0, source "ai"), in its tiers (groups
        stored before it tied near-ties: one tier per distinct score)."""
        records = []
        for group in self.store.ai_groups():
            ids, ai = group["survivors"], group["ai"]
            tiers = [[ids[row] for row in tier] for tier in ai.get("tiers") or confident_tiers(ai["scores"])]
            records.append(RankedGroupRecord(
                group["id"], group["prompt"],
                [CandidateRecord(c["id"], self.store.blobs.get(c["image"]), group["version"]) for c in group["candidates"]],
                [RankingRecord(f"ai-{group['id']}", AI_RANKER, 0, tiers, _when(group["created_at"]), source="ai")],
                modality_of_prompt(group["prompt"], known=None)))
        return records

    def _ab_records(self) -> list[ABJudgementRecord]:
        return [ABJudgementRecord(str(j["id"]), j["expert"], j["level"], j["prompt"], j["seed"], j["version_a"],
                                  j["version_b"], j["left"], j["verdict"], _when(j["created_at"]), j["seconds"])
                for j in self.store.ab_judgements()]

    def _secret(self) -> str:
        """The installation's export key (pseudonyms, DICOM UIDs): made once, kept in the work directory.

        Made atomically: the key is written to a private temporary file (mode 0600 from the start) and
        hard-linked into place, which fails if the key already exists; so two first exports at once
        agree on one key, and no one ever reads a half-written or briefly world-readable key.
        """
        path = self.workdir / "export.secret"
        if not path.exists():
            handle, temporary = tempfile.mkstemp(dir=self.workdir, prefix=".export.secret.")
            try:
                with os.fdopen(handle, "w") as written:
                    written.write(secrets.token_hex(32))
                    written.flush()
                    os.fsync(written.fileno())
                os.link(temporary, path)
            except FileExistsError:
                pass  # another export made it first: use theirs
            finally:
                os.unlink(temporary)
        return path.read_text().strip()

    def _reconcile_versions(self) -> None:
        """Put right what a kill -9 leaves, before the current version loads: staging folders of a
        version being written; the newest version folder when it is neither current nor recorded (it
        was renamed into place, and the kill came before it became current: set aside); and a saved
        version whose update the store never recorded (its ``meta.json`` names the groups it trained
        on and who asked, so the update is recorded now and those groups are not trained again)."""
        for folder in self.version_store.remove_staging():
            log.warning("removed %s: a version was being written when the server stopped", folder)
        recorded = {v["id"] for v in self.store.versions()}
        on_disk = self.version_store.list()
        if on_disk and on_disk[-1].id not in recorded and on_disk[-1].id != self.version_store.current:
            moved = self.version_store.set_aside(on_disk[-1].id)
            log.warning("set %s aside to %s: it never became current and is not in the database "
                        "(the server stopped while saving it); its groups stay unused", on_disk[-1].id, moved)
            on_disk.pop()
        updated = {u["version_id"] for u in self.store.updates() if u["applied"]}
        for version in on_disk:
            groups = version.metrics.get("groups")
            if groups is None or version.id in updated:
                continue  # a base version, or its update is recorded
            try:
                if version.id not in recorded:
                    self.store.record_version(version.id, version.parent, version.algorithm, version.metrics)
                self.store.record_update(version.metrics.get("who", "unknown"), version.algorithm, groups, True, version.id,
                                         f"{version.id}: recorded at start-up from its meta.json (the server stopped "
                                         "before recording this update)", version.metrics)
            except StoreError as error:
                log.warning("could not record the update that made %s: %s", version.id, error)
                continue
            log.warning("recorded the update that made %s from its meta.json: the server stopped before recording it; "
                        "its %d groups will not be trained again", version.id, len(groups))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _number(value: float) -> int | float:
    """A rating as the file had it: 3, not 3.0, when it is whole."""
    return int(value) if float(value).is_integer() else value


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)

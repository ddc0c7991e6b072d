"""Everything the workbench must not forget: experts, groups, candidates, rankings, versions, updates.

Rows live in SQL through SQLAlchemy: by default ``<workdir>/workbench.db``, SQLite in WAL mode so
that many browser sessions read while one writes; any SQLAlchemy URL (PostgreSQL for a shared box)
by option. Images and trajectories are bytes in a content-addressed folder (``data.blobs``,
``<workdir>/blobs``): rows hold their SHA-256 digests, ``store.blobs.get(digest)`` gives the bytes.

Decisions, and why:

- Every write is one short transaction, committed before the method returns, so a restart loses
  nothing and a crash mid-write leaves no half group. A group's blobs are written before its row:
  a row never points at a missing file (an orphan file after a crash is harmless).
- A group's status is derived, never stored: it is "ranked" once it holds ``wanted_rankings``
  rankings that are not skips. A stored status would need a read-then-write per ranking, which
  concurrent experts could interleave; a count cannot go stale.
- One ranking per (group, expert), enforced by a unique constraint: a second submission is refused
  with a message, also when two arrive at the same instant. A skip counts as that expert's answer.
- Versions' weights live in ``optim.versions``; the table mirrors their history for queries, so
  groups name their version as plain text, not as a foreign key.
- Methods return plain JSON-ready dicts (the HTTP API passes them on), never ORM objects.
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import (JSON, DateTime, ForeignKey, String, UniqueConstraint, create_engine, event, func, inspect, select,
                        text)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import (DeclarativeBase, Mapped, column_property, lazyload, mapped_column, relationship,
                            sessionmaker)

from data.blobs import BlobStore
from data.experts import LEVELS, ROLES
from data.modalities import modality_of_prompt
from data.rankings import RankingError, normalise_tiers, ranking_faults

POOL_SIZE = 20  # database connections kept open: the experts who may submit at the same instant
REMEMBERED_GROUPS = 4096  # groups whose candidates a store keeps in memory for rankings (then forgets them all)
RATINGS = (1, 2, 3)
HUMAN, AI = "human", "ai"  # a group's source
AB_CHOICES = ("left", "right", "same")  # what an expert picks in a blind pair
AB_SIDES = ("a", "b")  # the versions of a pair, older first


class StoreError(ValueError):
    """A request the store refuses (unknown id, duplicate ranking, bad digest); the message says which."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    """ISO 8601 in UTC; SQLite hands back naive datetimes, so the zone the store wrote is put back."""
    return moment.replace(tzinfo=moment.tzinfo or timezone.utc).isoformat()


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}  # PostgreSQL keeps the zone; SQLite drops it


class Expert(Base):
    __tablename__ = "experts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(10), default="expert")
    level: Mapped[int] = mapped_column(default=1)


class Group(Base):
    __tablename__ = "groups"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    prompt: Mapped[str]
    version: Mapped[str] = mapped_column(String(32))
    seeds: Mapped[list] = mapped_column(JSON)
    settings: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=_now, index=True)
    wanted_rankings: Mapped[int] = mapped_column(default=1)
    # "human": drawn for experts to rank; "ai": drawn for an amplified update and ranked by the reward
    # model (``ai`` holds its scores), never offered to experts, never exported as a human preference.
    source: Mapped[str] = mapped_column(String(8), default=HUMAN, server_default=HUMAN)
    ai: Mapped[dict | None] = mapped_column(JSON)
    candidates: Mapped[list[Candidate]] = relationship(order_by="Candidate.position", lazy="selectin")


class Candidate(Base):
    __tablename__ = "candidates"
    id: Mapped[str] = mapped_column(String(48), primary_key=True)  # "<group>-c<position>"
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), index=True)
    position: Mapped[int]
    seed: Mapped[int | None]
    image: Mapped[str] = mapped_column(String(64))  # blob digest
    trajectory: Mapped[str | None] = mapped_column(String(64))  # blob digest
    passed: Mapped[bool]
    quality: Mapped[float | None]
    modality: Mapped[dict] = mapped_column(JSON)  # modality -> probability
    reasons: Mapped[list] = mapped_column(JSON)


class Ranking(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("group_id", "expert_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), index=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    level: Mapped[int]  # the expert's level when ranking; a later promotion does not rewrite history
    tiers: Mapped[list] = mapped_column(JSON)  # best first; a tier holds ties; [] when skipped
    ratings: Mapped[dict | None] = mapped_column(JSON)  # candidate id -> 1..3
    skipped: Mapped[bool] = mapped_column(default=False)
    seconds: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(default=_now)


# Rankings that count towards a group's wanted number (skips do not), as a column of each Group row.
Group.ranked_by = column_property(
    select(func.count(Ranking.id)).where(Ranking.group_id == Group.id, Ranking.skipped.is_(False))
    .correlate_except(Ranking).scalar_subquery()
)
# Candidates that passed the selector, as a column of each Group row: a group none passed has nothing to rank,
# so it is never offered to an expert nor counted as waiting for a ranking.
Group.survivor_count = column_property(
    select(func.count(Candidate.id)).where(Candidate.group_id == Group.id, Candidate.passed.is_(True))
    .correlate_except(Candidate).scalar_subquery()
)


class Version(Base):
    __tablename__ = "versions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    parent: Mapped[str | None] = mapped_column(String(32))
    algorithm: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    metrics: Mapped[dict] = mapped_column(JSON)


class Update(Base):
    __tablename__ = "updates"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[str | None] = mapped_column(ForeignKey("versions.id"))  # None: the update was refused
    who: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    algorithm: Mapped[str] = mapped_column(String(16))
    applied: Mapped[bool]
    message: Mapped[str] = mapped_column(default="")
    metrics: Mapped[dict] = mapped_column(JSON)


class UpdateGroup(Base):
    """Which groups an update trained on; a group used by an applied update is not offered again."""

    __tablename__ = "update_groups"
    update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"), primary_key=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id"), primary_key=True, index=True)


class ImportedRating(Base):
    """A row of an imported ratings CSV. The image is kept as the PNG the expert saw, never as the
    source file: an imported DICOM's patient tags do not enter the store, so no export can leak them."""

    __tablename__ = "imported_ratings"
    id: Mapped[int] = mapped_column(primary_key=True)
    image: Mapped[str] = mapped_column(String(64))  # blob digest of the PNG rendering
    rating: Mapped[float]
    modality: Mapped[str] = mapped_column(String(8))
    level: Mapped[int]
    prompt: Mapped[str]
    source: Mapped[str]  # the file name and row, e.g. "ratings.csv row 7"
    imported_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Setting(Base):
    """Settings an admin changes in the page (the overlap share), kept across restarts."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict] = mapped_column(JSON)


class ABPair(Base):
    """A blind A/B pair the server showed an expert: one image of each version, same prompt and seed.

    Which version went on the left stays here and never reaches the browser; a judgement names a
    side, and the store turns it into the winning version. ``version_a`` is the older of the two.
    """

    __tablename__ = "ab_pairs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    prompt: Mapped[str]
    seed: Mapped[int]
    version_a: Mapped[str] = mapped_column(String(32))
    version_b: Mapped[str] = mapped_column(String(32))
    left: Mapped[str] = mapped_column(String(1))  # "a" or "b": the version shown on the left
    created_at: Mapped[datetime] = mapped_column(default=_now)


class ABJudgement(Base):
    """An expert's verdict on a pair: which VERSION won ("a", "b") or "same"; one per pair."""

    __tablename__ = "ab_judgements"
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[str] = mapped_column(ForeignKey("ab_pairs.id"), unique=True)
    level: Mapped[int]  # the expert's level when judging
    verdict: Mapped[str] = mapped_column(String(4))
    seconds: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(default=_now)


@dataclass
class NewImportedRating:
    image: bytes  # PNG
    rating: float
    modality: str
    level: int
    prompt: str
    source: str


class CandidateId(NamedTuple):
    """What a ranking is checked against: a candidate's id and whether it survived the selector."""

    id: str
    passed: bool


@dataclass
class NewCandidate:
    """A candidate as the sampler hands it over: its bytes go to blobs, the rows keep their digests."""

    image: bytes
    passed: bool
    seed: int | None = None
    quality: float | None = None
    modality: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    trajectory: bytes | None = None


class Store:
    def __init__(self, workdir: str | Path, url: str | None = None):
        """Open (and create) the store. A work directory that is a file, a URL that is not one, a database driver
        that is not installed or a server that does not answer raise ``StoreError`` saying which."""
        self.workdir = Path(workdir)
        if self.workdir.exists() and not self.workdir.is_dir():
            raise StoreError(f"the work directory {self.workdir} is a file, not a folder")
        self.blobs = BlobStore(self.workdir / "blobs")
        url = url or f"sqlite:///{self.workdir / 'workbench.db'}"
        try:
            # As many pooled connections as request threads that may query at once: past the pool's size,
            # each request would open and close its own (PostgreSQL starts a server process per connection).
            self.engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=POOL_SIZE)
            # SQLite takes one writer at a time and makes the others poll in sleeps of up to 100 ms; writers
            # of this process queue on a lock instead (other processes still meet the busy timeout).
            self._one_writer = threading.Lock() if self.engine.dialect.name == "sqlite" else contextlib.nullcontext()
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            Base.metadata.create_all(self.engine)
        except ArgumentError:
            typed = re.sub(r"(:)[^:/@]*@", r"\1***@", url)  # a password before an "@" stays hidden, parsed or not
            raise StoreError(f"the store URL {typed!r} is not an SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db, "
                             "or none for SQLite in the work directory)") from None
        except (NoSuchModuleError, ImportError) as error:
            raise StoreError(f"the store URL {_shown(url)} needs a database driver that is not installed: {error}") from None
        except OperationalError as error:
            raise StoreError(f"cannot open the store at {_shown(url)}: {error.orig}") from None
        _add_missing_columns(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # What never changes once stored, remembered so that a ranking is its insert alone (on a database
        # server each read is a round trip to a process that waits for a CPU while an update runs):
        self._group_candidates: dict[str, list[CandidateId]] = {}  # a group's candidates, position order
        self._expert_ids: dict[str, int] = {}  # an expert's row id (experts are never removed or renamed)

    def close(self) -> None:
        self.engine.dispose()

    def open_connections(self) -> None:
        """Open the pool's connections now, before the experts arrive (the page does this at launch).

        A database server starts a process for each new connection; opened on demand, twenty experts
        who submit at the same instant would each wait for one (measured: 40-60 ms at once on a 2-core
        box running an update, against 2-10 ms from the pool). SQLite opens a file: nothing to do."""
        if self.engine.dialect.name != "sqlite":
            connections = [self.engine.connect() for _ in range(POOL_SIZE)]
            for connection in connections:
                connection.close()  # back to the pool, still open

    # Experts --------------------------------------------------------------------------------------

    def add_expert(self, name: str, role: str = "expert", level: int = 1) -> dict:
        if role not in ROLES or level not in LEVELS:
            raise StoreError(f"expert {name!r}: role must be one of {ROLES} and level one of {LEVELS}")
        try:
            with self._session.begin() as s:
                s.add(expert := Expert(name=name, role=role, level=level))
        except IntegrityError:
            raise StoreError(f"expert {name!r} already exists") from None
        self._expert_ids[name] = expert.id
        return _row(expert)

    def set_expert(self, name: str, role: str = "expert", level: int = 1) -> dict:
        """Add the expert, or bring their role and level up to date (the accounts file changed)."""
        if role not in ROLES or level not in LEVELS:
            raise StoreError(f"expert {name!r}: role must be one of {ROLES} and level one of {LEVELS}")
        try:
            with self._session.begin() as s:
                expert = s.scalars(select(Expert).where(Expert.name == name)).first() or Expert(name=name)
                expert.role, expert.level = role, level
                s.add(expert)
        except IntegrityError:  # another session added the name just now: update theirs
            return self.set_expert(name, role, level)
        self._expert_ids[name] = expert.id
        return _row(expert)

    def get_expert(self, name: str) -> dict:
        with self._session() as s:
            return _row(self._expert(s, name))

    # Groups ---------------------------------------------------------------------------------------

    def add_group(self, prompt: str, version: str, seeds: list, settings: dict,
                  candidates: list[NewCandidate], wanted_rankings: int = 1, ai: dict | None = None) -> str:
        """Store a generated group and its candidates' blobs; returns the new group's id.

        ``ai``: the reward model's ranking (scores, agreement, model) of a group drawn for an amplified
        update; such a group's source is "ai" and no expert is asked to rank it."""
        if wanted_rankings < 1:
            raise StoreError(f"wanted_rankings must be at least 1, not {wanted_rankings}")
        group_id = uuid.uuid4().hex[:12]
        rows = [
            Candidate(id=f"{group_id}-c{k}", position=k, seed=c.seed,
                      image=self.blobs.put(c.image),
                      trajectory=None if c.trajectory is None else self.blobs.put(c.trajectory),
                      passed=bool(c.passed), quality=c.quality, modality=dict(c.modality), reasons=list(c.reasons))
            for k, c in enumerate(candidates)
        ]
        with self._session.begin() as s:
            s.add(Group(id=group_id, prompt=prompt, version=version, seeds=list(seeds), settings=dict(settings),
                        wanted_rankings=wanted_rankings, candidates=rows, source=HUMAN if ai is None else AI, ai=ai))
        self._remember_candidates(group_id, [CandidateId(c.id, c.passed) for c in rows])
        return group_id

    def ai_groups(self) -> list[dict]:
        """Groups the reward model ranked for amplified updates, oldest first, with its scores (``ai``)."""
        with self._session() as s:
            groups = s.scalars(select(Group).where(Group.source == AI).order_by(Group.created_at, Group.id)).all()
            return [_group_dict(g) for g in groups]

    def group_count(self) -> int:
        with self._session() as s:
            return s.scalar(select(func.count()).select_from(Group).where(Group.source == HUMAN))

    def get_group(self, group_id: str) -> dict:
        with self._session() as s:
            return _group_dict(self._group(s, group_id))

    def next_group_for(self, expert: str) -> dict | None:
        """The oldest group still short of its wanted rankings that this expert has not ranked or skipped, and
        that has a candidate to rank (a group where the selector passed none is never offered).

        Nothing is reserved: experts asking at the same instant may get the same group.
        """
        with self._session() as s:
            answered = select(Ranking.group_id).join(Expert).where(Expert.name == expert)  # none for a newcomer
            group = s.scalars(
                select(Group).where(Group.source == HUMAN, Group.ranked_by < Group.wanted_rankings,
                                    Group.survivor_count > 0, Group.id.not_in(answered))
                .order_by(Group.created_at, Group.id).limit(1)
            ).first()
            return None if group is None else _group_dict(group)

    def unused_ranked_groups(self) -> list[dict]:
        """Ranked groups no applied update has trained on yet, oldest first (a refused update used none)."""
        with self._session() as s:
            used = select(UpdateGroup.group_id).join(Update).where(Update.applied.is_(True))
            groups = s.scalars(
                select(Group).where(Group.source == HUMAN, Group.ranked_by >= Group.wanted_rankings,
                                    Group.id.not_in(used))
                .order_by(Group.created_at, Group.id)
            ).all()
            return [_group_dict(g) for g in groups]

    def ranked_prompts_trained(self) -> dict[str, int]:
        """Every prompt an expert has ranked (a skip is no ranking), in the order first ranked, with how many
        of its groups (human or AI-ranked) applied updates have trained on: where amplification is thinnest."""
        ranked = select(Ranking.group_id).where(Ranking.skipped.is_(False))
        used = select(UpdateGroup.group_id).join(Update).where(Update.applied.is_(True))
        with self._session() as s:
            prompts = s.execute(select(Group.prompt).where(Group.id.in_(ranked)).group_by(Group.prompt)
                                .order_by(func.min(Group.created_at))).scalars().all()
            trained = dict(s.execute(select(Group.prompt, func.count()).where(Group.id.in_(used))
                                     .group_by(Group.prompt)).all())
        return {prompt: trained.get(prompt, 0) for prompt in prompts}

    # Rankings -------------------------------------------------------------------------------------

    def add_ranking(self, group_id: str, expert: str, tiers: list | None, level: int | None = None,
                    ratings: dict | None = None, skipped: bool = False, seconds: float | None = None,
                    check_tiers: Callable[[list[str]], list] | None = None) -> dict:
        """Store one expert's ranking of a group (tiers best first), or their skip.

        The tiers must hold each of the group's surviving candidates exactly once; ratings (1-3)
        may cover any of them. ``level`` defaults to the expert's level now. ``check_tiers(survivors)``,
        when given, first checks the tiers against the survivors' ids and returns them as they are to
        be stored (the control room's ranking rules and messages).

        Every expert's submission takes this path, and on PostgreSQL each statement, BEGIN and COMMIT
        is a round trip to a server process that waits for a CPU while an update keeps both busy: with
        the group's candidates and the expert's id remembered (and a ``level`` given), the transaction
        is the insert alone. (pysqlite begins SQLite's transaction at the insert, so SQLite's write
        lock is held for one statement.)
        """
        try:
            with self._one_writer, self._session.begin() as s:
                candidates = self._candidates(s, group_id)
                if check_tiers is not None and not skipped:
                    tiers = check_tiers([c.id for c in candidates if c.passed])
                _check_answer(group_id, candidates, list(tiers or []), ratings, skipped)
                if level is None:
                    who = self._expert(s, expert)
                    expert_id, level = who.id, who.level
                else:
                    expert_id = self._expert_id(s, expert)
                if level not in LEVELS:
                    raise StoreError(f"level must be one of {LEVELS}, not {level!r}")
                row = Ranking(group_id=group_id, expert_id=expert_id, level=level, tiers=list(tiers or []),
                              ratings=ratings, skipped=skipped, seconds=seconds)
                s.add(row)
        except IntegrityError:  # the unique (group, expert) constraint, also when two submissions race
            raise StoreError(f"expert {expert!r} has already ranked group {group_id}; a group takes one ranking per expert") from None
        return _row(row, expert=expert)

    def rankings(self, group_id: str | None = None, expert: str | None = None) -> list[dict]:
        """Rankings, oldest first, of one group and/or one expert when given."""
        query = select(Ranking, Expert.name).join(Expert).order_by(Ranking.created_at, Ranking.id)
        if group_id is not None:
            query = query.where(Ranking.group_id == group_id)
        if expert is not None:
            query = query.where(Expert.name == expert)
        with self._session() as s:
            return [_row(r, expert=name) for r, name in s.execute(query)]

    def groups_with_rankings(self) -> list[dict]:
        """Every group that holds a ranking other than a skip, by id: its row, its candidates that passed the
        selector (``passed_candidates``, position order) and those rankings (``rankings``, oldest first, as
        ``rankings`` gives them). What an export reads, in three queries however many groups there are."""
        ranked = select(Ranking.group_id).where(Ranking.skipped.is_(False))
        with self._session() as s:
            groups = s.scalars(select(Group).where(Group.id.in_(ranked)).options(lazyload(Group.candidates))
                               .order_by(Group.id)).all()
            survivors = s.scalars(select(Candidate).where(Candidate.group_id.in_(ranked), Candidate.passed.is_(True))
                                  .order_by(Candidate.group_id, Candidate.position)).all()
            rankings = s.execute(select(Ranking, Expert.name).join(Expert).where(Ranking.skipped.is_(False))
                                 .order_by(Ranking.created_at, Ranking.id)).all()
        found = {g.id: _row(g, passed_candidates=[], rankings=[]) for g in groups}
        # A group first ranked between these reads is left out whole, as it would be by a read a moment earlier.
        for c in survivors:
            if c.group_id in found:
                found[c.group_id]["passed_candidates"].append(_row(c))
        for r, name in rankings:
            if r.group_id in found:
                found[r.group_id]["rankings"].append(_row(r, expert=name))
        return list(found.values())

    # Imported ratings -----------------------------------------------------------------------------

    def add_imported_ratings(self, rows: list[NewImportedRating], imported_by: str) -> int:
        """Store the good rows of an imported ratings file, all in one transaction; returns how many."""
        records = [ImportedRating(image=self.blobs.put(r.image), rating=float(r.rating), modality=r.modality,
                                  level=int(r.level), prompt=r.prompt, source=r.source, imported_by=imported_by)
                   for r in rows]
        with self._session.begin() as s:
            s.add_all(records)
        return len(records)

    def imported_ratings(self) -> list[dict]:
        with self._session() as s:
            return [_row(r) for r in s.scalars(select(ImportedRating).order_by(ImportedRating.id))]

    # Settings -------------------------------------------------------------------------------------

    def get_setting(self, key: str, default=None):
        with self._session() as s:
            row = s.get(Setting, key)
            return default if row is None else row.value["value"]

    def set_setting(self, key: str, value) -> None:
        with self._session.begin() as s:
            s.merge(Setting(key=key, value={"value": value}))

    # Blind A/B verification -----------------------------------------------------------------------

    def add_ab_pair(self, expert: str, prompt: str, seed: int, version_a: str, version_b: str, left: str) -> str:
        """Remember a pair shown to ``expert`` (``left``: which of the two versions is on the left); returns its id."""
        if left not in AB_SIDES:
            raise StoreError(f"left must be one of {AB_SIDES}, not {left!r}")
        if version_a == version_b:
            raise StoreError(f"an A/B pair compares two different versions, not {version_a!r} with itself")
        pair_id = uuid.uuid4().hex[:12]
        with self._session.begin() as s:
            expert_id = self._expert(s, expert).id
            if missing := [v for v in (version_a, version_b) if s.get(Version, v) is None]:
                raise StoreError(f"A/B pair names unrecorded versions: {', '.join(missing)}")
            s.add(ABPair(id=pair_id, expert_id=expert_id, prompt=prompt, seed=int(seed), version_a=version_a,
                         version_b=version_b, left=left))
        return pair_id

    def judge_ab_pair(self, pair_id: str, expert: str, choice: str, level: int | None = None,
                      seconds: float | None = None) -> dict:
        """Store ``expert``'s judgement of their pair: ``choice`` is the side ("left", "right") or "same";
        the stored verdict is the winning version ("a", "b") or "same". A pair takes one judgement."""
        if choice not in AB_CHOICES:
            raise StoreError(f"choice must be one of {AB_CHOICES}, not {choice!r}")
        with self._session() as s:
            pair, who = s.get(ABPair, pair_id), self._expert(s, expert)
            if pair is None:
                raise StoreError(f"unknown A/B pair {pair_id!r}: judge a pair the server showed you")
            if pair.expert_id != who.id:
                raise StoreError(f"A/B pair {pair_id} was shown to another expert, not to {expert!r}")
            level = who.level if level is None else level
            right = "b" if pair.left == "a" else "a"
            verdict = {"left": pair.left, "right": right, "same": "same"}[choice]
        if level not in LEVELS:
            raise StoreError(f"level must be one of {LEVELS}, not {level!r}")
        try:
            with self._session.begin() as s:
                s.add(ABJudgement(pair_id=pair_id, level=level, verdict=verdict, seconds=seconds))
        except IntegrityError:  # the unique pair_id, also when two submissions race
            raise StoreError(f"A/B pair {pair_id} is already judged; a pair takes one judgement") from None
        return self.ab_judgements(pair_id=pair_id)[0]

    def ab_judgements(self, expert: str | None = None, pair_id: str | None = None) -> list[dict]:
        """Judgements, oldest first, with their pair's prompt, seed, versions and sides (of one expert
        and/or one pair when given)."""
        query = (select(ABJudgement, ABPair, Expert.name).join(ABPair, ABJudgement.pair_id == ABPair.id)
                 .join(Expert, ABPair.expert_id == Expert.id).order_by(ABJudgement.created_at, ABJudgement.id))
        if expert is not None:
            query = query.where(Expert.name == expert)
        if pair_id is not None:
            query = query.where(ABJudgement.pair_id == pair_id)
        with self._session() as s:
            return [_row(j, expert=name, prompt=p.prompt, seed=p.seed, version_a=p.version_a,
                         version_b=p.version_b, left=p.left) for j, p, name in s.execute(query)]

    def recent_ranked_prompts(self, limit: int = 20) -> list[str]:
        """The prompts of the groups most recently ranked (skips aside), newest first, each once."""
        latest = func.max(Ranking.created_at)
        with self._session() as s:
            return list(s.scalars(select(Group.prompt).join(Ranking).where(Ranking.skipped.is_(False))
                                  .group_by(Group.prompt).order_by(latest.desc()).limit(limit)))

    # Versions and updates -------------------------------------------------------------------------

    def record_version(self, version_id: str, parent: str | None, algorithm: str | None,
                       metrics: dict | None = None) -> None:
        try:
            with self._session.begin() as s:
                s.add(Version(id=version_id, parent=parent, algorithm=algorithm, metrics=dict(metrics or {})))
        except IntegrityError:
            raise StoreError(f"version {version_id!r} is already recorded") from None

    def versions(self) -> list[dict]:
        with self._session() as s:
            return [_row(v) for v in s.scalars(select(Version).order_by(Version.created_at))]

    def record_update(self, who: str, algorithm: str, group_ids: list[str], applied: bool,
                      version: str | None = None, message: str = "", metrics: dict | None = None) -> int:
        """Record an update and the groups it used (also when refused, to keep the why); returns its id."""
        with self._session.begin() as s:
            known = set(s.scalars(select(Group.id).where(Group.id.in_(group_ids))))
            unknown = [g for g in group_ids if g not in known]
            if unknown:
                raise StoreError(f"update names unknown groups: {', '.join(unknown)}")
            if version is not None and s.get(Version, version) is None:
                raise StoreError(f"update names version {version!r}, which is not recorded (record_version first)")
            update = Update(version_id=version, who=who, algorithm=algorithm, applied=applied,
                            message=message, metrics=dict(metrics or {}))
            s.add(update)
            s.flush()
            s.add_all(UpdateGroup(update_id=update.id, group_id=g) for g in dict.fromkeys(group_ids))
        return update.id

    def updates(self) -> list[dict]:
        with self._session() as s:
            links = s.execute(select(UpdateGroup.update_id, UpdateGroup.group_id)).all()
            return [_row(u, groups=[g for i, g in links if i == u.id]) for u in s.scalars(select(Update).order_by(Update.id))]

    def counts(self) -> dict:
        """Groups per status and per modality (read from the prompt's prefix), rankings and skips per
        expert, and imported ratings per modality."""
        with self._session() as s:
            groups = s.execute(select(Group.prompt, Group.ranked_by >= Group.wanted_rankings, Group.survivor_count > 0)
                               .where(Group.source == HUMAN)).all()
            ai_groups = s.scalar(select(func.count()).select_from(Group).where(Group.source == AI))
            imported = s.execute(select(ImportedRating.modality, func.count()).group_by(ImportedRating.modality)).all()
            answers = s.execute(
                select(Expert.name, Ranking.skipped, func.count()).join(Ranking).group_by(Expert.name, Ranking.skipped)
            ).all()
        modalities = Counter(modality_of_prompt(prompt) or "unknown" for prompt, _, _ in groups)
        experts: dict[str, dict] = {}
        for name, skipped, n in answers:
            experts.setdefault(name, {"rankings": 0, "skipped": 0})["skipped" if skipped else "rankings"] += n
        ranked = sum(1 for _, done, _ in groups if done)
        empty = sum(1 for _, done, rankable in groups if not done and not rankable)
        return {"groups": len(groups), "ranked": ranked, "pending": len(groups) - ranked - empty, "empty": empty,
                "ai_groups": ai_groups,
                "per_modality": dict(modalities), "per_expert": experts, "imported_per_modality": dict(imported)}

    def version_summary(self) -> dict[str, dict]:
        """Per model version, what its groups scored: mean selector quality of the survivors, and the
        experts' mean 1-3 rating and how many ratings (absolute measures, unlike ranks, which are relative)."""
        with self._session() as s:
            quality = s.execute(select(Group.version, func.avg(Candidate.quality), func.count())
                                .join(Candidate).where(Candidate.passed.is_(True)).group_by(Group.version)).all()
            ratings = s.execute(select(Group.version, Ranking.ratings).join(Ranking)
                                .where(Ranking.skipped.is_(False))).all()
        summary = {version: {"quality": mean, "survivors": n, "rating": None, "ratings": 0} for version, mean, n in quality}
        given: dict[str, list[int]] = {}
        for version, values in ratings:
            given.setdefault(version, []).extend((values or {}).values())
        for version, values in given.items():
            if values:
                entry = summary.setdefault(version, {"quality": None, "survivors": 0})
                entry.update(rating=sum(values) / len(values), ratings=len(values))
        return summary

    # Lookups with clear errors --------------------------------------------------------------------

    def _group(self, s, group_id: str) -> Group:
        group = s.get(Group, group_id)
        if group is None:
            raise StoreError(f"unknown group {group_id!r}")
        return group

    def _candidates(self, s, group_id: str) -> list[CandidateId]:
        """The group's candidates, position order, remembered; an unknown group is refused."""
        if (known := self._group_candidates.get(group_id)) is not None:
            return known
        rows = s.execute(select(Candidate.id, Candidate.passed).where(Candidate.group_id == group_id)
                         .order_by(Candidate.position)).all()
        if not rows:
            self._group(s, group_id)  # raises, naming the group, when there is no such group
        return self._remember_candidates(group_id, [CandidateId(r.id, r.passed) for r in rows])

    def _remember_candidates(self, group_id: str, candidates: list[CandidateId]) -> list[CandidateId]:
        if len(self._group_candidates) >= REMEMBERED_GROUPS:
            self._group_candidates.clear()  # experts rank recent groups: the next few reads fill it again
        self._group_candidates[group_id] = candidates
        return candidates

    def _expert(self, s, name: str) -> Expert:
        expert = s.scalars(select(Expert).where(Expert.name == name)).first()
        if expert is None:
            raise StoreError(f"unknown expert {name!r} (add_expert first)")
        self._expert_ids[name] = expert.id
        return expert

    def _expert_id(self, s, name: str) -> int:
        """The expert's row id, remembered (a new expert's is learnt at enrolment or first use)."""
        known = self._expert_ids.get(name)
        return known if known is not None else self._expert(s, name).id


def _add_missing_columns(engine) -> None:
    """Columns added since a store was created (create_all makes new tables, never new columns)."""
    present = {c["name"] for c in inspect(engine).get_columns("groups")}
    added = {"source": f"VARCHAR(8) NOT NULL DEFAULT '{HUMAN}'", "ai": "JSON"}
    with engine.begin() as connection:
        for name, kind in added.items():
            if name not in present:
                connection.execute(text(f"ALTER TABLE groups ADD COLUMN {name} {kind}"))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """WAL lets readers run beside the one writer; busy_timeout makes a second writer wait, not fail."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _check_answer(group_id: str, candidates: list, tiers: list, ratings: dict | None, skipped: bool) -> None:
    """Refuse a ranking that does not rank exactly the group's survivors (``candidates``: rows with
    ``id`` and ``passed``), naming every offending id (``data.rankings`` finds them)."""
    if skipped:
        if tiers or ratings:
            raise StoreError(f"group {group_id}: a skip carries no tiers or ratings")
        return
    ids = {c.id for c in candidates}
    survivors = [c.id for c in candidates if c.passed]
    try:
        found = ranking_faults(normalise_tiers(tiers), survivors)
    except RankingError:
        raise StoreError(f"group {group_id}: a ranking is a list of non-empty tiers of candidate ids, not {tiers!r}") from None
    faults = []
    if unknown := [str(c) for c in found.unknown if c not in ids]:
        faults.append(f"unknown candidates {', '.join(unknown)}")
    if rejected := [c for c in found.unknown if c in ids]:
        faults.append(f"candidates the selector rejected {', '.join(rejected)}")
    if found.missing:
        faults.append(f"survivors left out {', '.join(found.missing)} (tie those you cannot tell apart)")
    if found.repeated:
        faults.append(f"candidates ranked twice {', '.join(sorted(str(c) for c in found.repeated))}")
    for candidate, rating in (ratings or {}).items():
        if candidate not in ids or rating not in RATINGS:
            faults.append(f"rating {rating!r} for {candidate!r} (ratings are 1-3 for this group's candidates)")
    if faults:
        raise StoreError(f"group {group_id}: ranking refused: {'; '.join(faults)}; survivors are {', '.join(survivors)}")


def _shown(url: str) -> str:
    """A store URL as messages show it: its password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def _row(row: Base, **extra) -> dict:
    """A row's columns as a JSON-ready dict (times as ISO text), plus ``extra``: no ORM object leaves a session."""
    values = {c.key: getattr(row, c.key) for c in row.__mapper__.column_attrs}
    return {k: _iso(v) if isinstance(v, datetime) else v for k, v in values.items()} | extra


def _group_dict(group: Group) -> dict:
    """A group with its candidates (position order), its survivors' ids and its derived status: "ranked", "pending"
    (waiting for rankings) or "empty" (the selector passed none of its candidates: nothing to rank)."""
    status = ("ranked" if group.ranked_by >= group.wanted_rankings else "empty" if not group.survivor_count
              else "pending")
    return _row(group, status=status,
                candidates=[_row(c) for c in group.candidates],
                survivors=[c.id for c in group.candidates if c.passed])

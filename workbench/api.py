"""Who may do what, in one place: the HTTP API and the page both call ``RoomAPI``.

``RoomAPI`` wraps ``ControlRoom`` with the caller: with an accounts file (``--auth users.yaml``)
the caller is the logged-in user, their role and level come from the file, and only admins apply
updates, roll back, import or export data or change the overlap; without one (a laptop) the one local user
is an admin and names themselves. ``register_api`` publishes the ARCHITECTURE verbs as Gradio API
endpoints (``/generate``, ``/rank``, ``/losses``, ``/apply_update``, ``/sample``, ``/versions``,
``/rollback``, ``/export``) with the Python methods' parameter names, and blind A/B verification
(``/ab_pair``, ``/ab_judge``, ``/ab_results``). ``plain_routes`` adds ``POST /room/rank``, a
ranking without Gradio's queue, and ``login_function`` the failed-login limit with the caller's
address.

Work on the model (generate, sample, A/B pairs, losses, update, rollback) shares the ``gpu`` concurrency group
of one: one GPU, one job at a time. Ranking, browsing and exports never queue behind it; exports
run one at a time among themselves.
"""

from __future__ import annotations

import contextvars
import functools
import math
import shutil
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.middleware import Middleware

from data.experts import LEVELS
from data.store import StoreError
from optim.preference.update import UpdateConfig
from optim.versions import UnknownVersion
from workbench.auth import LoginLockedOut, User, Users
from workbench.room import ControlRoom, RoomGroup
from workbench.verification import BlindPair

GPU = "gpu"  # the one concurrency group for model work
MAX_PROMPT_CHARS = 300
MAX_AI_GROUPS = 200  # AI-ranked groups one update may add
EXPORT_FILES = {"pickapic": "preferences-pickapic.parquet", "trl": "preferences-trl.parquet",
                "groups": "ranking-groups.parquet", "ratings_csv": "ratings.zip", "ab": "ab-judgements.parquet"}
OUTBOX_HOURS = 6  # files handed to browsers and clients are kept this long


@dataclass(frozen=True)
class Caller:
    name: str
    role: str  # "expert" or "admin"
    level: int  # 1-3, weights their votes

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class RoomAPI:
    def __init__(self, room: ControlRoom, users: Users | None = None):
        self.room = room
        self.users = users
        self.outbox = room.workdir / "outbox"  # the one folder Gradio may serve files from
        self.outbox.mkdir(exist_ok=True)
        self._enrolled: set[Caller] = set()
        self._export_lock = threading.Lock()  # one export at a time: each reads every ranking and image

    # ------------------------------------------------------------------ who is calling

    def caller(self, request: gr.Request | None, local_name: str = "", local_level: int = 1) -> Caller:
        """The logged-in user (accounts file), or the local user and the name they typed (maybe none yet)."""
        if self.users is None:
            name = (local_name or "").strip()  # may be empty until the user ranks
            if len(name) > 100:
                raise PermissionError("a name is at most 100 characters")
            return Caller(name, "admin", int(local_level))
        user = self.users.get(getattr(request, "username", None) or "")
        if user is None:  # the login layer lets no one through unauthenticated; a removed account ends here
            raise PermissionError("not logged in, or the account no longer exists: log in again")
        return self.enrolled(user)

    def enrolled(self, user: User) -> Caller:
        """The account as a caller, after making the store mirror its role and level.

        The login does this first (``login_function``), so an expert's first ranking is not also their
        enrolment; a call after the accounts file changed someone's level enrols them again here."""
        caller = Caller(user.name, user.role, user.level)
        if caller not in self._enrolled:
            self.room.enroll(caller.name, caller.role, caller.level)
            self._enrolled.add(caller)
        return caller

    def named_caller(self, request: gr.Request | None, expert: str, level: int, verb: str) -> Caller:
        """The caller; a logged-in client that names someone else is refused (answers are the caller's own)."""
        caller = self.caller(request, expert, level)
        if expert and expert != caller.name:
            raise PermissionError(f"logged in as {caller.name}: cannot {verb} as {expert!r}")
        return caller

    @staticmethod
    def require_admin(caller: Caller, action: str) -> None:
        if not caller.is_admin:
            raise PermissionError(f"only an admin can {action}; {caller.name} is an expert")

    @staticmethod
    def require_name(caller: Caller, answers: str) -> None:
        """A local user who has typed no name yet cannot answer: ``answers`` are stored under the name."""
        if not caller.name:
            raise PermissionError(f"type your name first: {answers} are stored under it")

    # ------------------------------------------------------------------ the verbs

    def generate(self, caller: Caller, prompt: str, n: int | None = None, seed: int = 0, on_batch=None) -> RoomGroup:
        return self.room.generate(_short(prompt), n, whole_number(seed, "the seed"), on_batch=on_batch)

    def sample(self, caller: Caller, prompt: str, n: int = 4, seed: int = 0, version: str | None = None) -> list:
        return self.room.sample(_short(prompt), n, whole_number(seed, "the seed"), version or None)

    def rank(self, caller: Caller, group_id: str, tiers: list, ratings: dict | None = None, skipped: bool = False,
             seconds: float | None = None) -> dict:
        self.require_name(caller, "rankings")
        return self.room.rank(group_id, tiers, caller.name, ratings=ratings or None, skipped=skipped, seconds=seconds,
                              level=caller.level)

    def ab_pair(self, caller: Caller, version_a: str | None = None, version_b: str | None = None,
                prompt: str | None = None, seed: int | None = None) -> BlindPair:
        """A blind pair for the caller (any expert); by default the current version against its parent."""
        self.require_name(caller, "judgements")
        return self.room.ab_pair(caller.name, version_a or None, version_b or None, _short(prompt) or None,
                                 None if seed is None else whole_number(seed, "the seed"), level=caller.level)

    def ab_judge(self, caller: Caller, pair_id: str, choice: str, seconds: float | None = None) -> dict:
        """Store the caller's answer to their pair. The reply names no version: the verdict would tell
        which side held which, and unblind the pairs still to come."""
        self.require_name(caller, "judgements")
        self.room.ab_judge(pair_id, caller.name, choice, seconds, level=caller.level)
        return {"pair_id": pair_id, "stored": True}

    def ab_results(self, caller: Caller) -> list[dict]:
        """Win-rates per version pair: overall and per modality, and per expert for admins; an expert sees only
        their own row."""
        results = self.room.ab_results()
        if caller.is_admin:
            return results
        return [r | {"per_expert": {n: t for n, t in r["per_expert"].items() if n == caller.name}} for r in results]

    def apply_update(self, caller: Caller, algorithm: str = "grpo", group_ids: list[str] | None = None,
                     settings: dict | None = None, on_progress=None):
        """``settings`` may hold ``ai_groups``: how many groups the reward model ranks for this update, and
        ``ai_weight``: the loss weight of each, against an expert level's 1-3."""
        self.require_admin(caller, "apply an update")
        if algorithm not in ("grpo", "dpo"):
            raise ValueError(f"algorithm must be 'grpo' or 'dpo', not {algorithm!r}")
        settings = dict(settings or {})
        ai_groups = settings.pop("ai_groups", None)
        if ai_groups is not None and not 0 <= whole_number(ai_groups, "ai_groups") <= MAX_AI_GROUPS:
            raise ValueError(f"ai_groups must be a whole number from 0 to {MAX_AI_GROUPS}, not {ai_groups!r}")
        ai_weight = settings.pop("ai_weight", None)
        if ai_weight is not None and (isinstance(ai_weight, bool) or not isinstance(ai_weight, (int, float))
                                      or not 0 < ai_weight <= max(LEVELS)):
            raise ValueError(f"ai_weight must be a number above 0 and at most {max(LEVELS)} (a level-{max(LEVELS)} "
                             f"expert's weight), not {ai_weight!r}")
        return self.room.apply_update(algorithm, who=caller.name or "local", group_ids=group_ids or None,
                                      config=update_config(self.room.config.update, settings),
                                      ai_groups=None if ai_groups is None else int(ai_groups),
                                      ai_weight=None if ai_weight is None else float(ai_weight), on_progress=on_progress)

    def rollback(self, caller: Caller, version_id: str) -> dict:
        self.require_admin(caller, "roll back the model")
        return self.room.rollback(version_id)

    def import_ratings(self, caller: Caller, path: str | Path) -> dict:
        self.require_admin(caller, "import ratings")
        return self.room.import_ratings(path, imported_by=caller.name or "local")

    def set_overlap(self, caller: Caller, share: float) -> None:
        self.require_admin(caller, "change the overlap")
        self.room.set_overlap(share)

    def export(self, caller: Caller, kind: str, dicom: bool = False) -> Path:
        """Admins: every ranking as a dataset file. Exports run one at a time (a second waits): each
        reads every stored image, so several at once would starve the experts' rankings."""
        self.require_admin(caller, "export datasets")
        if kind not in EXPORT_FILES:
            raise ValueError(f"unknown export kind {kind!r}; expected one of {', '.join(EXPORT_FILES)}")
        with self._export_lock:
            return self.room.export(kind, self.new_outbox_folder() / EXPORT_FILES[kind], dicom=dicom)

    def version_lora(self, caller: Caller, version_id: str) -> Path:
        """Any logged-in caller: a version as a diffusers LoRA file, which ``pipeline.load_lora_weights(path)``
        loads into a pipeline of the same base model and family (a few MB, read from the version store)."""
        name = f"{self.room.policy.model_path.name}-{version_id}-lora.safetensors"
        return self.room.policy.export_lora(self.room.version_store, version_id, self.new_outbox_folder() / name)

    # ------------------------------------------------------------------ files for browsers and clients

    def new_outbox_folder(self) -> Path:
        """A fresh folder for files to hand out; folders older than ``OUTBOX_HOURS`` are removed."""
        cutoff = time.time() - OUTBOX_HOURS * 3600
        for old in self.outbox.iterdir():
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        folder = self.outbox / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def files(self, images, stem: str) -> list[gr.FileData]:
        folder = self.new_outbox_folder()
        out = []
        for k, image in enumerate(images):
            path = folder / f"{stem}-{k}.png"
            image.save(path)
            out.append(gr.FileData(path=str(path), orig_name=path.name, mime_type="image/png"))
        return out

    def group_json(self, group: RoomGroup) -> dict:
        """A group for API clients: ids and image files; survivors blind (no scores), rejected with reasons."""
        survivors = self.files([c.image for c in group.survivors], group.id)
        rejected = self.files([c.image for c in group.rejected], f"{group.id}-rejected")
        return {
            "id": group.id, "prompt": group.prompt, "version": group.version, "message": group.message,
            "survivors": [{"id": c.id, "image": f} for c, f in zip(group.survivors, survivors)],
            "rejected": [{"id": c.id, "image": f, "scores": c.scores, "reasons": c.reasons}
                         for c, f in zip(group.rejected, rejected)],
        }


def _short(prompt: str) -> str:
    """The prompt, refused when over the limit or when it holds a control character (line breaks and
    tabs included: a prompt is one line of text, and it travels into exports, CSVs and DICOM tags).
    A page's text box limits typing; API clients are checked here."""
    if len(prompt or "") > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    for position, character in enumerate(prompt or "", 1):
        if unicodedata.category(character) == "Cc":
            raise ValueError(f"the prompt holds a control character (U+{ord(character):04X}) at position {position}; "
                             "a prompt is one line of plain text")
    return prompt


def switch(value, name: str) -> bool:
    """A setting that is on or off: JSON's true or false only (``bool("false")`` would be on)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value


def number(value, name: str, whole: bool = False) -> float | int:
    """A finite number typed or sent for ``name`` (with ``whole``, a whole one: 2.5 passes is refused rather
    than cut to 2); an empty field, a word or a NaN is refused, naming the field."""
    try:
        figure = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        figure = math.nan
    if not math.isfinite(figure) or (whole and not figure.is_integer()):
        shown = "an empty field" if value is None else repr(value)
        raise ValueError(f"{name} must be {'a whole number' if whole else 'a number'}, not {shown}")
    return int(figure) if whole else figure


def whole_number(value, name: str) -> int:
    return number(value, name, whole=True)


def update_config(base: UpdateConfig, settings: dict) -> UpdateConfig:
    """The room's update defaults with the page's or client's main settings applied; unknown names refused,
    and each value checked by its kind, its name in the error."""
    top = {"learning_rate": number, "epochs": whole_number, "kl_budget": number, "balance_modalities": switch}
    nested = {"clip_range": ("grpo", number), "kl_weight": ("grpo", number), "beta": ("dpo", number)}
    unknown = sorted(set(settings) - set(top) - set(nested))
    if unknown:
        raise ValueError(f"unknown update settings {', '.join(unknown)}; known: {', '.join([*top, *nested, 'ai_groups', 'ai_weight'])}")
    config = replace(base, **{k: top[k](v, k) for k, v in settings.items() if k in top})
    for name, (part, cast) in nested.items():
        if name in settings:
            config = replace(config, **{part: replace(getattr(config, part), **{name: cast(settings[name], name)})})
    if config.learning_rate <= 0 or config.epochs < 1:
        raise ValueError("learning_rate must be positive and epochs at least 1")
    return config


def clear_errors(function):
    """Refusals (bad input, unknown ids, not allowed) reach the browser or client as their own message."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ValueError, PermissionError, StoreError, UnknownVersion) as error:
            raise gr.Error(str(error), print_exception=False) from error
    return wrapper


RANK_ROUTE = "/room/rank"


class RankBody(BaseModel):
    """A ranking as JSON, with the ``/rank`` API endpoint's parameter names."""

    group_id: str
    tiers: list[list[str]] = []
    ratings: dict[str, int] | None = None
    skipped: bool = False
    seconds: float | None = None
    expert: str = ""  # local mode: the name to rank under; with logins, the caller is the logged-in user
    level: int = 1  # local mode only


def logged_in_user(request: Request) -> str | None:
    """The user named by Gradio's login cookie (set by ``POST /login``): the lookup Gradio's own routes make."""
    app = request.app
    token = (request.cookies.get(f"access-token-{app.cookie_id}")
             or request.cookies.get(f"access-token-unsecure-{app.cookie_id}"))
    return app.tokens.get(token)


def plain_routes(api: RoomAPI) -> list[APIRoute]:
    """Light calls as plain FastAPI routes on Gradio's own app (``serve`` passes them to it).

    Why: through Gradio's queue, a ranking costs about 100-300 ms of the server's time even with one
    expert (the queue's join, its event stream and per-event bookkeeping), so twenty experts at once
    wait over a second for a 3 ms database insert; Gradio's direct ``/gradio_api/run`` route still
    builds the whole page's session state per call (about 35 ms). A plain route answers in a few
    milliseconds, with the same login (Gradio's cookie), the same ``RoomAPI`` role logic and the
    same parameters as the ``/rank`` endpoint, which stays for gradio_client.
    """
    def rank(body: RankBody, request: Request) -> JSONResponse:
        username = logged_in_user(request)
        if api.users is not None and username is None:
            return JSONResponse({"error": "not logged in: POST /login with username and password first"}, 401)
        try:
            caller = api.named_caller(gr.Request(request, username=username), body.expert, body.level, "rank")
            return JSONResponse(api.rank(caller, body.group_id, body.tiers, body.ratings, body.skipped, body.seconds))
        except PermissionError as error:
            return JSONResponse({"error": str(error)}, 403)
        except (ValueError, StoreError) as error:
            return JSONResponse({"error": str(error)}, 400)

    return [APIRoute(RANK_ROUTE, rank, methods=["POST"])]


_client_address: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_address", default=None)


class RecordClientAddress:
    """ASGI middleware: the caller's address, for the failed-login limit (Gradio calls the login
    function with the name and password alone; the login route runs in this request's context)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        client = scope.get("client") if scope["type"] == "http" else None
        token = _client_address.set(client[0] if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _client_address.reset(token)


def login_function(api: RoomAPI):
    """Gradio's ``auth`` callable: the accounts file's check with the caller's address; a locked-out
    name or address gets HTTP 429 with the reason and the wait, not "incorrect credentials". A good
    login enrols the expert in the store, so twenty experts' first rankings are inserts alone."""
    def login(username: str, password: str) -> bool:
        try:
            good = api.users.authenticate(username, password, address=_client_address.get())
        except LoginLockedOut as error:
            raise HTTPException(429, str(error), headers={"Retry-After": str(math.ceil(error.retry_after))}) from None
        # The user is None only if the accounts file lost the name since.
        if good and (user := api.users.get(username)) is not None:
            api.enrolled(user)
        return good
    return login


def app_options(api: RoomAPI) -> dict:
    """What ``serve`` adds to Gradio's FastAPI app: the plain routes (before Gradio's own) and the
    middleware that lets the login limit see the caller's address."""
    return {"routes": plain_routes(api), "middleware": [Middleware(RecordClientAddress)]}


def register_api(api: RoomAPI) -> None:
    """The ARCHITECTURE verbs as Gradio API endpoints; call inside the page's ``gr.Blocks``."""
    room = api.room

    @clear_errors
    def generate(prompt: str, n: int = 4, seed: int = 0, expert: str = "", request: gr.Request = None) -> dict:
        """Draw candidates until n pass the selector; returns the group's id and its candidates' ids and images."""
        return api.group_json(api.generate(api.caller(request, expert), prompt, n, seed))

    @clear_errors
    def rank(group_id: str, tiers: list[list[str]], expert: str = "", ratings: dict | None = None,
             skipped: bool = False, seconds: float | None = None, level: int = 1,
             request: gr.Request = None) -> dict:
        """Store a ranking: tiers best first, a tier holds ties. With logins, expert is the logged-in user."""
        return api.rank(api.named_caller(request, expert, level, "rank"), group_id, tiers, ratings, skipped, seconds)

    @clear_errors
    def losses(group_id: str, expert: str = "", request: gr.Request = None) -> dict:
        """GRPO and DPO numbers for a ranked group under the current weights."""
        api.caller(request, expert)
        return room.losses(group_id)

    @clear_errors
    def apply_update(algorithm: str = "grpo", group_ids: list[str] | None = None, settings: dict | None = None,
                     expert: str = "", request: gr.Request = None) -> dict:
        """Admins: train on ranked groups not yet used (or those named); a new version or a refusal."""
        result = api.apply_update(api.caller(request, expert), algorithm, group_ids, settings)
        return {"applied": result.applied, "version": result.version.id if result.applied else None,
                "message": result.message, "metrics": result.metrics}

    @clear_errors
    def sample(prompt: str, n: int = 4, seed: int = 0, version: str = "", expert: str = "",
               request: gr.Request = None) -> list[gr.FileData]:
        """Plain samples from any version (the current one by default), no selector."""
        images = api.sample(api.caller(request, expert), prompt, n, seed, version)
        return api.files(images, f"sample-{version or 'current'}")

    @clear_errors
    def versions(expert: str = "", request: gr.Request = None) -> list[dict]:
        """Every version with its parent, algorithm and metrics; one is current."""
        api.caller(request, expert)
        return room.versions()

    @clear_errors
    def rollback(version_id: str, expert: str = "", request: gr.Request = None) -> dict:
        """Admins: make an earlier version current."""
        return api.rollback(api.caller(request, expert), version_id)

    @clear_errors
    def export(kind: str, dicom: bool = False, expert: str = "", request: gr.Request = None) -> gr.FileData:
        """Admins: every ranking as a dataset: pickapic, trl, groups (parquet) or ratings_csv (zip; dicom=True
        adds de-identified DICOM copies)."""
        path = api.export(api.caller(request, expert), kind, dicom)
        return gr.FileData(path=str(path), orig_name=path.name)

    @clear_errors
    def ab_pair(version_a: str = "", version_b: str = "", prompt: str = "", seed: int | None = None,
                expert: str = "", level: int = 1, request: gr.Request = None) -> dict:
        """A blind A/B pair: one image from each of two versions (default: the current one and its
        parent), same prompt and seed, sides random; returns the pair's id and the left and right images."""
        pair = api.ab_pair(api.named_caller(request, expert, level, "judge"), version_a, version_b, prompt, seed)
        left, right = api.files([pair.left, pair.right], f"pair-{pair.id}")
        return {"pair_id": pair.id, "prompt": pair.prompt, "left": left, "right": right}

    @clear_errors
    def ab_judge(pair_id: str, choice: str, seconds: float | None = None, expert: str = "", level: int = 1,
                 request: gr.Request = None) -> dict:
        """Judge your pair: choice "left", "right" or "same". A pair takes one judgement."""
        return api.ab_judge(api.named_caller(request, expert, level, "judge"), pair_id, choice, seconds)

    @clear_errors
    def ab_results(expert: str = "", request: gr.Request = None) -> list[dict]:
        """Per version pair: the newer version's wins, same, losses, win-rate and Wilson 95% interval,
        overall and per expert (experts see their own row)."""
        return api.ab_results(api.caller(request, expert))

    @clear_errors
    def version_lora(version_id: str, expert: str = "", request: gr.Request = None) -> gr.FileData:
        """A version as a diffusers LoRA file (.safetensors): pipeline.load_lora_weights(path) loads it into a
        pipeline of the same base model (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)."""
        path = api.version_lora(api.caller(request, expert), version_id)
        return gr.FileData(path=str(path), orig_name=path.name)

    gr.api(version_lora, api_name="version_lora", concurrency_limit=None)
    for function in (generate, losses, apply_update, sample, rollback, ab_pair):
        gr.api(function, api_name=function.__name__, concurrency_id=GPU, concurrency_limit=1)
    for function in (rank, versions, export, ab_judge, ab_results):
        gr.api(function, api_name=function.__name__, concurrency_limit=None)

"""The control room page (Gradio Blocks): Rank, Optimize, Models, Verify, Data, Experts.

Thin: every action calls ``RoomAPI`` (``workbench/api.py``), which checks who may do it and calls
``ControlRoom``; the page only lays out, shuffles what it shows, and keeps each browser session's
ranking in progress. ``build_page`` makes the Blocks: a header (``Page``: who is asking, and what
every tab shares), then one function per tab that builds its components and wires its events
(``rank_tab`` ... ``experts_tab``), then what one tab's action refreshes in another and what the
page fills when it loads. ``serve`` launches them with the login (when an accounts file is given),
the keyboard shortcuts, and analytics, run history and monitoring off.

Ranking is blind: survivors are shown in a fresh random order, numbered 1..k, with no scores and no
version. Click (or type the digit) in order of preference; "tie" joins the last pick to the one
before it; Backspace undoes; s skips; Enter submits; n takes the next group from the queue.

Verification is blind too: two images of one prompt and seed, one from each of two versions, on
random sides that only the server knows. Left arrow, ``=`` or right arrow answers, and the next
pair loads. The win-rates table refreshes when asked (or the tab is opened), not after every
answer: a table that changed with each answer would tell which side held the newer version.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # patient data: no analytics, ever

import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from data.diversity import diversity_change  # noqa: E402
from data.experts import LEVELS  # noqa: E402
from data.phantoms import all_prompts  # noqa: E402
from workbench.api import (  # noqa: E402
    EXPORT_FILES, GPU, MAX_AI_GROUPS, MAX_PROMPT_CHARS, OUTBOX_HOURS, RoomAPI, app_options, clear_errors, login_function,
    register_api)
from workbench.room import RoomGroup  # noqa: E402

SLOTS = 8  # the most survivors a group shows
MAX_UPLOAD = "1gb"  # the largest file the page or the API accepts (a ratings zip with its images)
KEYS_JS = (Path(__file__).parent / "keys.js").read_text()
NO_RANKING_YET = "Rank a group on the Rank tab: its GRPO and DPO numbers show here."
_picks_lock = threading.Lock()  # picks arrive one HTTP call per key press; their edits must not interleave

# How events run. Every event of the page is private: the HTTP API is ``register_api``'s verbs.
PRIVATE = dict(api_visibility="private")
ON_GPU = dict(concurrency_id=GPU, concurrency_limit=1, **PRIVATE)  # model work: one at a time
QUICK = dict(concurrency_limit=None, **PRIVATE)
# A ranking's clicks skip Gradio's queue: each is a direct call on this session's state (a few ms),
# not a queue join and event stream (100 ms or more each once twenty experts click at once).
RANKING_CLICK = dict(queue=False, **PRIVATE)


@dataclass
class Ranking:
    """One browser session's ranking in progress (a ``gr.State``, so never shared between sessions)."""

    group_id: str | None = None
    order: list[str] = field(default_factory=list)  # candidate ids in the shuffled order shown, slot k = order[k]
    tiers: list[list[int]] = field(default_factory=list)  # slots, best tier first
    started: float = 0.0
    answered: bool = False  # this group's ranking or skip is stored: a second Submit has nothing to store
    last_ranked: str | None = None  # the group this session ranked last (the Optimize tab's numbers are its)
    last_order: list[str] = field(default_factory=list)  # that group's order on screen, for its slot numbers

    def placed(self) -> set[int]:
        return {slot for tier in self.tiers for slot in tier}

    def describe(self) -> str:
        if self.group_id is None:
            return "No group yet: type a prompt and press **Generate**, or **Next** for the queue."
        if not self.order:
            return "No candidate passed the selector: nothing to rank. Press **Next (n)** or **Generate** for another group."
        order = " › ".join(" = ".join(str(slot + 1) for slot in tier) for tier in self.tiers) or "nothing yet"
        left = [str(k + 1) for k in range(len(self.order)) if k not in self.placed()]
        return f"**Your order, best first:** {order}  \nStill to place: {', '.join(left) or 'none: press Submit (Enter)'}"


@dataclass
class Verifying:
    """One browser session's blind A/B pair on screen (a ``gr.State``); the versions stay on the server."""

    pair_id: str | None = None
    shown_at: float = 0.0
    judged: int = 0  # answers given in this session
    defaults: tuple = (None, None)  # the versions the page chose last (the current one's parent and it)


class Page:
    """What every tab shares, made inside the Blocks: the API and its room, local mode, the header (who
    is signed in; in local mode the name and level fields, ``me``, that every handler reads last), this
    browser session's ranking and blind pair (``gr.State``s), and what only admins see (``admin_only``)."""

    def __init__(self, api: RoomAPI):
        self.api, self.room, self.local = api, api.room, api.users is None
        self.ranking = gr.State(Ranking())
        self.verifying = gr.State(Verifying())
        with gr.Row():
            gr.Markdown("## Medical preference workbench")
            self.who = gr.Markdown()
        with gr.Row(visible=self.local):
            self.name = gr.Textbox(label="Your name (rankings are stored under it)", max_length=100, scale=3)
            self.level = gr.Dropdown(list(LEVELS), value=1, label="Your level (weights your votes)", scale=1)
        self.remembered = gr.BrowserState(["", 1], storage_key="workbench-expert")
        self.me = [self.name, self.level]
        self.admin_only: list = []  # groups and tabs shown to admins only (in local mode, to everyone)

    def caller(self, request, name_value="", level_value=1):
        return self.api.caller(request, name_value, level_value or 1)


@dataclass
class View:
    """A handler that fills ``outputs`` from ``inputs``: what a tab offers for other tabs' events to refresh."""

    fn: Callable
    outputs: list
    inputs: list = field(default_factory=list)


def build_page(api: RoomAPI) -> gr.Blocks:
    with gr.Blocks(title="Medical preference workbench") as blocks:
        page = Page(api)
        submitted = rank_tab(page)
        history, updated = optimize_tab(page)
        models = models_tab(page)
        verify_tab(page)
        counts = data_tab(page)
        experts_tab(page)

        # What one tab's action refreshes in another.
        submitted.success(counts.fn, None, counts.outputs, **QUICK)
        updated.then(models.fn, None, models.outputs, **QUICK)
        on_load(page, blocks, [counts, models, history])
        register_api(api)
    return blocks


def on_load(page: Page, blocks: gr.Blocks, views: list[View]) -> None:
    """When the page loads: the header, the name and level remembered by this browser (local mode),
    what admins alone see, and the ``views``; and the name and level remembered whenever they change."""

    def load(stored, request: gr.Request):
        if page.local:
            name_value, level_value = stored if isinstance(stored, list) and len(stored) == 2 else ("", 1)
            header = "Local mode: one user, who is also the admin."
            admin = True
        else:
            name_value, level_value = "", 1
            me = page.caller(request)
            header = f"Signed in as **{me.name}** ({me.role}, level {me.level}) · [Log out](/logout)"
            admin = me.is_admin
        shown = [gr.update(visible=admin)] * len(page.admin_only)
        filled = []
        for view in views:
            values = view.fn()
            filled += [values] if len(view.outputs) == 1 else list(values)
        return [header, name_value, level_value, *shown, *filled]

    blocks.load(load, [page.remembered], [page.who, page.name, page.level, *page.admin_only,
                                          *(output for view in views for output in view.outputs)], **QUICK)
    gr.on([page.name.change, page.level.change], lambda n, lv: [n, lv], page.me, [page.remembered], **QUICK)


# ---------------------------------------------------------------------------------------------- Rank


def rank_tab(page: Page):
    """Generate or take the next group, rank it blind (picks, ties, undo), rate, submit or skip.
    Returns the Submit event: the page follows it with the group's losses and the counts."""
    api, room, caller = page.api, page.room, page.caller
    with gr.Tab("Rank", id="rank"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=all_prompts()[0], max_length=MAX_PROMPT_CHARS, scale=4)
            seed = gr.Number(value=0, precision=0, label="Seed", scale=1)
            generate_button = gr.Button("Generate", variant="primary", scale=1, elem_id="rank-generate")
        with gr.Accordion("Prompt queue: Next (n) takes a stored group waiting for you, else the first line", open=False):
            queue = gr.Textbox(value="\n".join(all_prompts()), lines=6, show_label=False)
        next_button = gr.Button("Next (n)", elem_id="rank-next")
        gr.Markdown(f"**Selector:** {room.sampler.selector.describe()}", elem_id="selector-info")
        status = gr.Markdown()
        images, ratings, columns, picks = [], [], [], []
        for row in range(0, SLOTS, 4):
            with gr.Row():
                for k in range(row, row + 4):
                    with gr.Column(visible=False, min_width=160) as column:
                        images.append(gr.Image(label=str(k + 1), interactive=False, type="pil", height=280,
                                               buttons=["fullscreen"]))
                        picks.append(gr.Button(f"{k + 1}: pick", size="sm", elem_id=f"rank-pick-{k}"))
                        ratings.append(gr.Radio(["1", "2", "3"], label="Rating (1 poor, 3 good)", elem_id=f"rank-rating-{k}"))
                    columns.append(column)
        order_text = gr.Markdown(Ranking().describe(), elem_id="rank-order")
        with gr.Row():
            tie_button = gr.Button("Tie with previous (t)", elem_id="rank-tie")
            undo_button = gr.Button("Undo (Backspace)", elem_id="rank-undo")
            skip_button = gr.Button("Skip (s)", elem_id="rank-skip")
            submit_button = gr.Button("Submit (Enter)", variant="primary", elem_id="rank-submit")
        with gr.Accordion("Rejected by the selector", open=False):
            rejected = gr.Gallery(columns=6, height="auto", show_label=False)

    def show(state: Ranking, group: RoomGroup, message: str):
        """Fill the slots with a group's survivors, shuffled; reset this session's ranking."""
        shuffled = group.survivors[:]
        random.shuffle(shuffled)
        state.group_id, state.order, state.tiers, state.started = group.id, [c.id for c in shuffled], [], time.time()
        state.answered = False
        gallery = [(_enlarged(c.image), "; ".join(c.reasons)) for c in group.rejected]
        return [state, message or group.message, state.describe(), gallery] + _slots(
            [_enlarged(c.image) for c in shuffled], shuffled)

    slot_outputs = [page.ranking, status, order_text, rejected, *columns, *images, *ratings]

    @clear_errors
    def on_generate(text, seed_value, state, name_value, level_value, request: gr.Request,
                    progress=gr.Progress()):
        group = api.generate(caller(request, name_value, level_value), text, None, seed_value,
                             on_batch=_drawing(progress))
        return show(state, group, "")

    @clear_errors
    def on_next(queue_text, seed_value, state, name_value, level_value, request: gr.Request,
                progress=gr.Progress()):
        """A stored group waiting for this expert, else a new group for the queue's first prompt on a fresh seed
        (shown in the Seed box): the queue comes round again, and the same prompt and seed would draw the same
        candidates."""
        who_ = caller(request, name_value, level_value)
        waiting = room.next_group(who_.name) if who_.name else None
        if waiting is not None:
            return [queue_text, seed_value, *show(state, waiting, "A stored group waiting for your ranking.")]
        lines = [line for line in queue_text.splitlines() if line.strip()]
        if not lines:
            raise ValueError("the prompt queue is empty: add prompts, one per line")
        fresh_seed = random.randrange(2**31)
        group = api.generate(who_, lines[0], None, fresh_seed, on_batch=_drawing(progress))
        return ["\n".join(lines[1:] + lines[:1]), fresh_seed, *show(state, group, "")]

    def on_pick(slot: int):
        def pick(state: Ranking):
            with _picks_lock:
                if slot < len(state.order) and slot not in state.placed():
                    state.tiers.append([slot])
            return state, state.describe()
        return pick

    def on_tie(state: Ranking):
        with _picks_lock:
            if len(state.tiers) >= 2 and len(state.tiers[-1]) == 1:
                last = state.tiers.pop()
                state.tiers[-1].extend(last)
        return state, state.describe()

    def on_undo(state: Ranking):
        with _picks_lock:
            if state.tiers:
                state.tiers[-1].pop()
                if not state.tiers[-1]:
                    state.tiers.pop()
        return state, state.describe()

    @clear_errors
    def on_submit(state, name_value, level_value, request: gr.Request, *rating_values):
        return answer(state, caller(request, name_value, level_value), rating_values, skipped=False)

    @clear_errors
    def on_skip(state, name_value, level_value, request: gr.Request):
        return answer(state, caller(request, name_value, level_value), [], skipped=True)

    def answer(state: Ranking, who_, rating_values, skipped: bool):
        """Store this session's ranking (or skip) of its group, with the ratings given and the time taken.
        A second Submit or Skip of a group already answered (Enter pressed twice) stores nothing and says so."""
        if state.group_id is None:
            raise ValueError("no group to rank: Generate or Next first")
        if state.answered:
            return state, f"Group {state.group_id} is answered already. Press **Next (n)** for another group."
        if not state.order and not skipped:
            raise ValueError("no candidate of this group passed the selector: nothing to rank; press Next (n)")
        if not skipped and len(state.placed()) < len(state.order):
            left = [str(k + 1) for k in range(len(state.order)) if k not in state.placed()]
            raise ValueError(f"place every candidate first (still to place: {', '.join(left)}); tie those you cannot tell apart")
        tiers = [[state.order[slot] for slot in tier] for tier in state.tiers]
        given = {state.order[k]: int(v) for k, v in enumerate(rating_values[:len(state.order)]) if v}
        seconds = round(time.time() - state.started, 1)
        api.rank(who_, state.group_id, [] if skipped else tiers, None if skipped else given, skipped, seconds)
        state.answered = True
        if not skipped:
            state.last_ranked, state.last_order = state.group_id, list(state.order)
        done = "Skipped" if skipped else "Ranking stored"
        return state, f"{done} (group {state.group_id}, {seconds} s). Press **Next (n)** for another group."

    ranking, me = page.ranking, page.me
    generate_button.click(on_generate, [prompt, seed, ranking, *me], slot_outputs, **ON_GPU)
    next_button.click(on_next, [queue, seed, ranking, *me], [queue, seed, *slot_outputs], **ON_GPU)
    for k, button in enumerate(picks):
        button.click(on_pick(k), [ranking], [ranking, order_text], **RANKING_CLICK)
    tie_button.click(on_tie, [ranking], [ranking, order_text], **RANKING_CLICK)
    undo_button.click(on_undo, [ranking], [ranking, order_text], **RANKING_CLICK)
    submitted = submit_button.click(on_submit, [ranking, *me, *ratings], [ranking, status], **RANKING_CLICK)
    skip_button.click(on_skip, [ranking, *me], [ranking, status], **RANKING_CLICK)
    return submitted


# ---------------------------------------------------------------------------------------------- Optimize


def optimize_tab(page: Page) -> tuple[View, object]:
    """The GRPO and DPO numbers of the group this session ranked last (computed when the tab opens, not after
    every ranking: they take the generator, which other experts' groups wait for), an update (admins), and
    per-version plots. Returns the plots' view and the update's event (the page refreshes the Models tab
    after it)."""
    api, room, caller = page.api, page.room, page.caller
    with gr.Tab("Optimize", id="optimize") as tab:
        optimize_status = gr.Markdown(NO_RANKING_YET)
        losses_button = gr.Button("Compute losses for my last group")
        gr.Markdown("### GRPO: rewards from the ranking, group-normalised advantages, ratio and KL to the reference")
        grpo_table = gr.Dataframe(interactive=False)
        gr.Markdown("### Diffusion-DPO: every ordered pair, implicit rewards and margin")
        dpo_table = gr.Dataframe(interactive=False)
        with gr.Group(visible=page.local) as admin_update:
            gr.Markdown("### Apply an update (admins): trains on every ranked group no update has used")
            with gr.Row():
                algorithm = gr.Radio(["grpo", "dpo"], value=room.config.update.algorithm, label="Algorithm")
                learning_rate = gr.Number(value=room.config.update.learning_rate, label="Learning rate")
                epochs = gr.Number(value=room.config.update.epochs, precision=0, label="Passes over the groups",
                                   info=f"each pass takes one optimizer step per {room.config.update.groups_per_step} "
                                        f"groups (human and AI-ranked), at least {room.config.update.min_steps_per_pass}")
                clip = gr.Number(value=room.config.update.grpo.clip_range, label="GRPO clip range")
                beta = gr.Number(value=room.config.update.dpo.beta, label="DPO beta")
                ai_groups = gr.Number(value=room.config.amplify.ai_groups, precision=0, minimum=0,
                                      maximum=MAX_AI_GROUPS, label="AI-ranked groups to add",
                                      info="drawn for the ranked prompts, those trained on least first, and ranked "
                                           "by the reward model learned from the experts; each adds about as much "
                                           "training time as a ranked group, and beyond "
                                           f"{room.config.update.groups_per_step * room.config.update.min_steps_per_pass} "
                                           f"groups every {room.config.update.groups_per_step} add an optimizer step "
                                           "to each pass; 0 trains on human rankings only")
                ai_weight = gr.Number(value=room.config.amplify.ai_weight, minimum=0, maximum=max(LEVELS),
                                      label="Weight of an AI-ranked group",
                                      info=f"in the loss, against an expert's level (1-{max(LEVELS)}), which weighs "
                                           "each ranked group")
                balance = gr.Checkbox(value=room.config.update.balance_modalities, label="Balance modalities (GRPO)",
                                      info="each modality among the experts' groups gets the same share of the update, "
                                           "however many groups of it they ranked; off: each group weighs its "
                                           "experts' levels alone")
            update_button = gr.Button("Apply update", variant="primary", elem_id="apply-update")
            update_status = gr.Markdown()
        with gr.Row():
            loss_plot = gr.LinePlot(x="version", y="loss", title="Loss of each update (last step)", height=220)
            reward_plot = gr.LinePlot(x="version", y="score", color="measure", height=220,
                                      title="Per version: mean expert rating and selector quality (0-1)")
            kl_plot = gr.LinePlot(x="version", y="kl", title="KL from the previous version", height=220)
    page.admin_only.append(admin_update)

    @clear_errors
    def on_losses(state: Ranking, name_value, level_value, request: gr.Request):
        caller(request, name_value, level_value)
        if state.last_ranked is None:
            return NO_RANKING_YET, pd.DataFrame(), pd.DataFrame()
        numbers = room.losses(state.last_ranked)
        label = {cid: f"{k + 1}" for k, cid in enumerate(state.last_order)}
        g, d = numbers["grpo"], numbers["dpo"]
        grpo = pd.DataFrame([{"candidate": label.get(c["id"], c["id"]), "id": c["id"], **{k: _shown(c[k]) for k in
                              ("reward", "advantage", "ratio", "kl")}} for c in g["candidates"]])
        dpo = pd.DataFrame([{"winner": label.get(p["winner"]), "loser": label.get(p["loser"]), "weight": p["weight"],
                             "margin": _shown(p["margin"]), "winner reward": _shown(p["winner_reward"]),
                             "loser reward": _shown(p["loser_reward"]), "loss": _shown(p["loss"])} for p in d["pairs"]])
        dpo_total = ("no ordered pair (all tied)" if d["loss"] is None else
                     f"loss **{d['loss']:.4f}**, accuracy {d['accuracy']:.2f}, beta {d['beta']:g}")
        text = (f"Group `{state.last_ranked}`. GRPO: loss **{g['loss']:.4g}**, mean KL {g['kl']:.3g} "
                f"({g['std_convention']}). DPO: {dpo_total}.")
        return text, grpo, dpo

    @clear_errors
    def on_update(algo, lr, n_epochs, clip_range, beta_value, ai_count, ai_group_weight, balanced, name_value,
                  level_value, request: gr.Request, progress=gr.Progress()):
        who_ = caller(request, name_value, level_value)
        progress(0.0, desc="applying the update")
        result = api.apply_update(who_, algo, None, {"learning_rate": lr, "epochs": n_epochs,
                                                     "clip_range": clip_range, "beta": beta_value,
                                                     "ai_groups": ai_count, "ai_weight": ai_group_weight,
                                                     "balance_modalities": balanced},
                                  on_progress=lambda fraction, what: progress(fraction, desc=what))
        model = result.metrics.get("reward_model") or {}
        accuracy = model.get("heldout_accuracy")
        judged = ("" if accuracy is None else
                  f"\n\nReward model: {accuracy:.0%} of {model['heldout_pairs']} held-out pairs ordered as the experts did "
                  f"(each by a fit that did not see its group; {model['folds']}-fold cross-validation)"
                  + "".join(f"; {name} {m['accuracy']:.0%} of {m['pairs']}"
                            for name, m in model.get("heldout_by_modality", {}).items()) + "."
                  + features_text(model))
        checked = probe_text(result.metrics.get("probe"))
        return (f"**{result.version.id}** is now current: {result.message}{judged}{checked}" if result.applied
                else f"**Refused.** {result.message}{judged}{checked}")

    def plots():
        rows = room.history()
        frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["version", "loss", "kl", "rating", "quality"])
        rewards = frame.melt(id_vars=["version"], value_vars=["rating", "quality"], var_name="measure",
                             value_name="score").dropna()
        return frame.dropna(subset=["loss"]), rewards, frame.dropna(subset=["kl"])

    shown = [optimize_status, grpo_table, dpo_table]
    tab.select(on_losses, [page.ranking, *page.me], shown, **ON_GPU)
    losses_button.click(on_losses, [page.ranking, *page.me], shown, **ON_GPU)
    updated = update_button.click(on_update, [algorithm, learning_rate, epochs, clip, beta, ai_groups, ai_weight, balance,
                                              *page.me],
                                  [update_status], **ON_GPU)
    history = View(plots, [loss_plot, reward_plot, kl_plot])
    updated.then(history.fn, None, history.outputs, **QUICK)
    return history, updated


# ---------------------------------------------------------------------------------------------- Models


def models_tab(page: Page) -> View:
    """Versions: compare two on the same seeds, download one as a diffusers LoRA, roll back (admins).
    Returns the versions view (the page refreshes it after an update)."""
    api, room, caller = page.api, page.room, page.caller
    with gr.Tab("Models", id="models"):
        versions_table = gr.Dataframe(interactive=False)
        with gr.Row():
            version_a = gr.Dropdown(label="Version A")
            version_b = gr.Dropdown(label="Version B")
            compare_prompt = gr.Textbox(label="Prompt", value=all_prompts()[0], max_length=MAX_PROMPT_CHARS, scale=3)
            compare_seed = gr.Number(value=0, precision=0, label="Seed")
        compare_button = gr.Button("Compare on the same seeds")
        with gr.Row():
            gallery_a = gr.Gallery(label="A", columns=2, height="auto")
            gallery_b = gr.Gallery(label="B", columns=2, height="auto")
        with gr.Row():
            lora_button = gr.Button("Download version A as a diffusers LoRA", elem_id="version-lora")
            lora_file = gr.File(label="LoRA file: pipeline.load_lora_weights(path) reads it", elem_id="version-lora-file")
        with gr.Group(visible=page.local) as admin_rollback:
            with gr.Row():
                rollback_to = gr.Dropdown(label="Roll back to (admins)")
                rollback_button = gr.Button("Roll back")
        models_status = gr.Markdown()
    page.admin_only.append(admin_rollback)

    def models_view():
        listed = room.versions()
        table = pd.DataFrame([{"version": v["id"], "current": "yes" if v["current"] else "", "parent": v["parent"],
                               "algorithm": v["algorithm"], "created": v["created"],
                               "loss": v["metrics"].get("loss_last"), "kl": v["metrics"].get("kl_from_previous")}
                              for v in listed])
        ids = [v["id"] for v in listed]
        current = next(v["id"] for v in listed if v["current"])
        return (table, gr.update(choices=ids, value=ids[0]), gr.update(choices=ids, value=current),
                gr.update(choices=ids, value=current))

    @clear_errors
    def on_compare(a, b, text, seed_value, name_value, level_value, request: gr.Request, progress=gr.Progress()):
        who_ = caller(request, name_value, level_value)
        progress(0.0, desc=f"drawing 4 images from {a}")
        first = [_enlarged(i) for i in api.sample(who_, text, 4, seed_value, a)]
        progress(0.5, desc=f"drawing 4 images from {b} on the same seeds")
        return first, [_enlarged(i) for i in api.sample(who_, text, 4, seed_value, b)]

    @clear_errors
    def on_version_lora(version, name_value, level_value, request: gr.Request):
        return str(api.version_lora(caller(request, name_value, level_value), version))

    @clear_errors
    def on_rollback(target, name_value, level_value, request: gr.Request):
        was_current = room.policy.version
        version = api.rollback(caller(request, name_value, level_value), target)
        if version["id"] == was_current:
            return f"**{version['id']}** was current already: nothing changed."
        return f"**{version['id']}** is current again; the next round samples from it."

    models = View(models_view, [versions_table, version_a, version_b, rollback_to])
    me = page.me
    compare_button.click(on_compare, [version_a, version_b, compare_prompt, compare_seed, *me],
                         [gallery_a, gallery_b], **ON_GPU)
    lora_button.click(on_version_lora, [version_a, *me], [lora_file], **QUICK)
    rollback_button.click(on_rollback, [rollback_to, *me], [models_status], **ON_GPU).then(
        models.fn, None, models.outputs, **QUICK)
    return models


# ---------------------------------------------------------------------------------------------- Verify


def verify_tab(page: Page) -> None:
    """Blind A/B pairs of two versions, judged with the arrows, and the newer version's win-rates."""
    api, room, caller = page.api, page.room, page.caller
    with gr.Tab("Verify", id="verify") as tab:
        gr.Markdown("Blind A/B: one image from each of two versions, same prompt, same seed, sides at random. "
                    "Which is better? **Left (←)**, **Same (=)** or **Right (→)**; the next pair follows.")
        with gr.Row():
            verify_a = gr.Dropdown(label="Compare version (default: the current one's parent)")
            verify_b = gr.Dropdown(label="with version (default: the current one)")
            verify_next = gr.Button("New pair", elem_id="verify-next")
        verify_status = gr.Markdown("Open this tab or press **New pair** to see a pair.", elem_id="verify-status")
        with gr.Row():
            verify_left = gr.Image(label="Left", interactive=False, type="pil", height=320, buttons=["fullscreen"])
            verify_right = gr.Image(label="Right", interactive=False, type="pil", height=320, buttons=["fullscreen"])
        with gr.Row():
            left_button = gr.Button("Left better (←)", elem_id="verify-left")
            same_button = gr.Button("Same (=)", elem_id="verify-same")
            right_button = gr.Button("Right better (→)", elem_id="verify-right")
        gr.Markdown("### Win-rate of the newer version per version pair (\"same\" counts as half a win; "
                    "95% Wilson interval)")
        verify_results = gr.Button("Refresh results", size="sm", elem_id="verify-results")
        verify_table = gr.Dataframe(interactive=False, elem_id="verify-table")

    def verify_versions(a, b, state: Verifying):
        """The version selectors' choices, keeping versions the expert picked; otherwise the defaults, the current
        one's parent and it, followed after an update or a rollback."""
        listed = room.versions()
        ids = [v["id"] for v in listed]
        current = next(v for v in listed if v["current"])
        defaults = (current["parent"], current["id"])
        if (a, b) == state.defaults or a not in ids or b not in ids:
            a, b = defaults
        state.defaults = defaults
        return gr.update(choices=ids, value=a), gr.update(choices=ids, value=b), state

    @clear_errors
    def on_pair(a, b, state: Verifying, name_value, level_value, request: gr.Request, progress=gr.Progress()):
        progress(None, desc="drawing one image from each version")
        pair = api.ab_pair(caller(request, name_value, level_value), a, b)
        state.pair_id, state.shown_at = pair.id, time.time()
        return (state, f"**Pair {state.judged + 1}** of this session · {pair.prompt}: which is better?",
                _enlarged(pair.left), _enlarged(pair.right))

    def on_first_pair(a, b, state: Verifying, name_value, level_value, request: gr.Request, progress=gr.Progress()):
        """Opening the tab shows a pair, unless one is already waiting for this session's answer."""
        if state.pair_id is not None:
            return state, gr.update(), gr.update(), gr.update()
        if len(room.versions()) < 2:
            return state, "Only one version so far: an update makes the second one to compare with.", None, None
        return on_pair(a, b, state, name_value, level_value, request, progress)

    def on_judge(choice: str):
        @clear_errors
        def judge(state: Verifying, name_value, level_value, request: gr.Request):
            if state.pair_id is None:
                raise ValueError("no pair to judge yet: wait for it, or press New pair")
            seconds = round(time.time() - state.shown_at, 1)
            api.ab_judge(caller(request, name_value, level_value), state.pair_id, choice, seconds)
            state.pair_id, state.judged = None, state.judged + 1
            return state, f"Stored ({state.judged} in this session). Drawing the next pair…", None, None
        return judge

    def results_view(name_value, level_value, request: gr.Request):
        return ab_table(api.ab_results(caller(request, name_value, level_value)))

    verifying, me = page.verifying, page.me
    verify_opened = tab.select(verify_versions, [verify_a, verify_b, verifying], [verify_a, verify_b, verifying],
                               **QUICK)
    verify_opened.then(results_view, me, [verify_table], **QUICK)
    pair_view = [verifying, verify_status, verify_left, verify_right]
    verify_opened.then(on_first_pair, [verify_a, verify_b, verifying, *me], pair_view, **ON_GPU)
    verify_next.click(on_pair, [verify_a, verify_b, verifying, *me], pair_view, **ON_GPU)
    for button, choice in ((left_button, "left"), (same_button, "same"), (right_button, "right")):
        button.click(on_judge(choice), [verifying, *me], pair_view, **QUICK).success(
            on_pair, [verify_a, verify_b, verifying, *me], pair_view, **ON_GPU)
    verify_results.click(results_view, me, [verify_table], **QUICK)


# ---------------------------------------------------------------------------------------------- Data


def data_tab(page: Page) -> View:
    """Counts per status, modality and expert; dataset downloads; ratings imports (admins). Returns the
    counts view (the page refreshes it after a ranking)."""
    api, room, caller = page.api, page.room, page.caller
    with gr.Tab("Data", id="data"):
        counts_text = gr.Markdown()
        with gr.Group(visible=page.local) as admin_export:
            gr.Markdown("### Download the preference data (admins)")
            with gr.Row():
                export_kind = gr.Dropdown(list(EXPORT_FILES), value="pickapic", label="Dataset")
                export_dicom = gr.Checkbox(label="ratings_csv: add de-identified DICOM copies")
                export_button = gr.Button("Prepare download", elem_id="export")
                export_file = gr.File(label="Download", elem_id="export-file")
        with gr.Group(visible=page.local) as admin_import:
            gr.Markdown("### Import ratings (admins): a zip of the ratings CSV and the images it names")
            import_file = gr.File(file_types=[".zip"], label="Ratings zip")
            import_button = gr.Button("Import")
            import_report = gr.Textbox(label="Import report", lines=6, interactive=False)
    page.admin_only += [admin_export, admin_import]

    def counts_view():
        c = room.counts()
        modality = "\n".join(f"| {m} | {n} | {c['imported_per_modality'].get(m, 0)} |" for m, n in
                             sorted({**{m: 0 for m in c["imported_per_modality"]}, **c["per_modality"]}.items()))
        expert = "\n".join(f"| {e} | {v['rankings']} | {v['skipped']} |" for e, v in sorted(c["per_expert"].items()))
        empty = f", {c['empty']} where the selector passed no candidate" if c["empty"] else ""
        return (f"**{c['groups']} groups**: {c['ranked']} ranked, {c['pending']} waiting for a ranking{empty}.\n\n"
                f"| modality | groups | imported ratings |\n|---|---|---|\n{modality}\n\n"
                f"| expert | rankings | skipped |\n|---|---|---|\n{expert}")

    @clear_errors
    def on_export(kind, dicom, name_value, level_value, request: gr.Request, progress=gr.Progress()):
        progress(None, desc=f"writing {EXPORT_FILES.get(kind, kind)} from every stored ranking (one export at a time)")
        return str(api.export(caller(request, name_value, level_value), kind, dicom and kind == "ratings_csv"))

    @clear_errors
    def on_import(file, name_value, level_value, request: gr.Request, progress=gr.Progress()):
        if file is None:
            raise ValueError("choose a ratings zip first")
        if not str(file).lower().endswith(".zip"):
            raise ValueError(f"{Path(file).name} is not a zip: upload the ratings CSV zipped with the images it names "
                             "(a CSV alone reaches the server without its images)")
        progress(None, desc="reading the ratings and storing their images")
        report = api.import_ratings(caller(request, name_value, level_value), file)
        return f"{report['imported']} rows imported.\n{report['report']}", counts_view()

    export_button.click(on_export, [export_kind, export_dicom, *page.me], [export_file], **QUICK)
    import_button.click(on_import, [import_file, *page.me], [import_report, counts_text], **QUICK)
    return View(counts_view, [counts_text])


# ---------------------------------------------------------------------------------------------- Experts


def experts_tab(page: Page) -> None:
    """Admins: rankings per expert, their agreement, and the share of groups sent to two experts."""
    api, room, caller = page.api, page.room, page.caller
    with gr.Tab("Experts", id="experts", visible=page.local) as tab:
        experts_table = gr.Dataframe(interactive=False, label="Rankings per expert")
        agreement_table = gr.Dataframe(interactive=False, label="Agreement (Kendall tau-b) on groups ranked by two experts")
        with gr.Row():
            overlap = gr.Slider(0, 1, value=0.0, step=0.05, label="Share of new groups sent to two experts")
            overlap_button = gr.Button("Save overlap")
        experts_status = gr.Markdown()
    page.admin_only.append(tab)

    def experts_view(name_value, level_value, request: gr.Request):
        if not caller(request, name_value, level_value).is_admin:
            return pd.DataFrame(), pd.DataFrame(), gr.update(), "Admins only."
        agreement = pd.DataFrame(room.agreement(), columns=["expert_a", "expert_b", "groups", "defined", "tau_b"])
        return pd.DataFrame(room.experts()), agreement, gr.update(value=room.overlap), ""

    @clear_errors
    def on_overlap(share, name_value, level_value, request: gr.Request):
        api.set_overlap(caller(request, name_value, level_value), share)
        return f"From now on {share:.0%} of new groups go to two experts."

    tab.select(experts_view, page.me, [experts_table, agreement_table, overlap, experts_status], **QUICK)
    overlap_button.click(on_overlap, [overlap, *page.me], [experts_status], **QUICK)


def _shown(value: float) -> float:
    """Four significant digits for a table: small KLs stay visible, long tails go."""
    return float(f"{value:.4g}")


def ab_table(results: list[dict]) -> pd.DataFrame:
    """The Verify tab's results: per version pair, all experts, then each modality judged (only when there are
    several: one would repeat the total), then each expert shown (``RoomAPI.ab_results``)."""
    rows = []
    for pair in results:
        modalities = pair["per_modality"].items() if len(pair["per_modality"]) > 1 else []
        for expert, modality, counts in [("all experts", "all", pair["overall"]),
                                         *(("all experts", m, c) for m, c in modalities),
                                         *((e, "all", c) for e, c in pair["per_expert"].items())]:
            rows.append({"versions": f"{pair['version_a']} → {pair['version_b']}", "expert": expert,
                         "modality": modality, "judgements": counts["n"], "newer better": counts["wins"],
                         "same": counts["same"], "older better": counts["losses"],
                         "win-rate of newer": round(counts["win_rate"], 3),
                         "95% interval": f"{counts['low']:.3f} – {counts['high']:.3f}"})
    return pd.DataFrame(rows, columns=["versions", "expert", "modality", "judgements", "newer better", "same",
                                       "older better", "win-rate of newer", "95% interval"])


def features_text(model: dict) -> str:
    """Which features the reward model read the images by, and, when it compared several, each one's held-out
    accuracy (``optim.preference.reward_model.fit_best``); empty when it compared none."""
    compared = model.get("features_compared") or {}
    if len(compared) < 2 or compared[model["features"]] is None:  # nothing compared, or nothing held out
        return ""
    others = ", ".join(f"{name} {accuracy:.0%}" for name, accuracy in compared.items()
                       if name != model["features"] and accuracy is not None)
    return (f" It reads the images by their {model['features']} features, right on "
            f"{compared[model['features']]:.0%} of the held-out pairs against {others}.")


def probe_text(probe: dict | None) -> str:
    """An update's fixed-seed checks against the base model (``ControlRoom``'s probe), as a paragraph for the
    Optimize tab; empty when the room ran none."""
    if probe is None:
        return ""
    text = (f"On {probe['candidates']} fixed seeds against the base model: the selector passes "
            f"{probe['pass_rate_trained']:.0%} (base {probe['pass_rate_base']:.0%})")
    change = diversity_change(probe["diversity_base"], probe["diversity_trained"])
    if change is not None:
        text += (f"; the candidates of a prompt differ {probe['diversity_trained']:.3f} from one another "
                 f"(base {probe['diversity_base']:.3f}, {change:+.0%})")
    return f"\n\n{text}."


def _drawing(progress: gr.Progress):
    """The rejection sampler's per-batch report as the page's progress bar."""
    progress(0, desc="drawing candidates")
    return lambda drawn, kept, budget: progress(drawn / budget, desc=f"{kept} passed of {drawn} drawn")


def _slots(images: list, candidates: list) -> list:
    """Updates for every slot: visible with its image and a cleared rating while a candidate fills it."""
    shown = len(candidates)
    return ([gr.update(visible=k < shown) for k in range(SLOTS)]
            + [images[k] if k < shown else None for k in range(SLOTS)]
            + [gr.update(value=None) for _ in range(SLOTS)])


def _enlarged(image, size: int = 256):
    """Small model outputs (64 px for the embedded default) scaled up by whole pixels to be seen, not smoothed."""
    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def serve(api: RoomAPI, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> gr.Blocks:
    """Launch the page; with an accounts file every route asks for a login first.

    The store's connections are opened first. Uploads are limited to ``MAX_UPLOAD``; every hour,
    Gradio's cache of uploaded and handed-out files loses what is older than the outbox's hours, and
    at shutdown all of it.
    """
    api.room.store.open_connections()
    page = build_page(api)
    page.queue(default_concurrency_limit=None)
    page.delete_cache = (3600, OUTBOX_HOURS * 3600)
    page.launch(
        server_name=host, server_port=port, prevent_thread_lock=True, quiet=not block,
        auth=None if api.users is None else login_function(api),
        auth_message="Medical preference workbench: log in with the account your admin made for you. "
                     "After 5 failed logins, that name and address wait 30 s.",
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(api.outbox)], head=f"<script>{KEYS_JS}</script>",
        enable_monitoring=False, run_history=False, show_error=True, ssr_mode=False,
        app_kwargs=app_options(api),  # POST /room/rank without Gradio's queue; the caller's address for logins
    )
    # What exists now lives as long as the server (the model, the app, the modules). Python's full garbage
    # collection walks every tracked object while holding the GIL: with about 900,000 of them, one took
    # 0.43 s, and every expert's ranking waited for it. Frozen, they are left out of every collection.
    gc.collect()
    gc.freeze()
    if block:
        page.block_thread()
    return page

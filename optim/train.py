"""Offline training at scale: Diffusion-DPO on a Pick-a-Pic-format dataset, or GRPO with AI feedback.

The same command runs on one device or on many; ``accelerate config`` or launch flags pick how::

    accelerate launch -m optim.train --data pairs.parquet --algorithm dpo --epochs 2 --batch-size 4
    accelerate launch -m optim.train --data pairs.parquet --two-stage
    accelerate launch -m optim.train --algorithm grpo --prompts prompts.txt --group-size 4 --steps 20

On CPUs, ``accelerate launch --cpu --num_processes N`` starts ONE process unless MPI is set up, so use
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`` (torchrun, gloo). The run prints
how many processes it has.

This file reads top to bottom: the run's settings (``TrainConfig``, the in-process update's
``UpdateConfig`` with offline defaults), the run (``train``), the trainer (``Trainer``) and the command
line. The data it reads is ``optim.train_data``'s: Pick-a-Pic parquet pairs (ties dropped, and how many is
printed) or pairs within each prompt of a ratings CSV (``--data RATINGS.csv``). What running on many
processes takes is ``optim.distributed``'s.

Two stages (``--two-stage``): stage 1 trains on every pair; stage 2 only on pairs whose BOTH images the
selector passes against the caption, so the last epochs learn from images an expert would accept.

GRPO with AI feedback (``--algorithm grpo``): each prompt's group is sampled from the current policy, the
selector scores it (quality if passed, 0 if rejected), and one optimizer step covers every stored step of
the batch's groups (fresh samples: the ratio is 1, the clip idle; the KL term holds the policy near the reference).
Every step trained means the last, narrowest steps carry most of the gradient unless ``--step-weighting noise``
weighs each step by its kernel std (``optim.preference.grpo.step_weigher``).

Precision: ``--dtype`` (bf16, fp16, fp32) sets the frozen networks' dtype; without it, a launch with
``--mixed_precision bf16`` or ``fp16`` picks that dtype, else the policy's default (half on a GPU, fp32 on
a CPU). The LoRA weights and AdamW states stay fp32. Autocast stays OFF: sampling runs outside the
wrapped model and scoring inside it, so an autocast there would score in another precision than the
samples were drawn in (the ratio would not start at 1); ``Policy.predict`` does the casts for both.
fp16 keeps accelerate's gradient scaler.

Checkpoints: after each epoch the main process writes ``<out>/<timestamp>/epoch_<n>/adapter.safetensors``
(the LoRA weights, for ``Policy.load_lora_state_dict``) and ``meta.json`` (config, epoch, stage, metrics,
base model, and every process's digest of its weights, which must agree). Never pickles. Metrics go to
accelerate's trackers: tensorboard under the run folder by default, wandb when asked (offline unless
WANDB_MODE says otherwise), or none. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, gather_object, set_seed
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset

from optim.distributed import PolicyLoss, lora_digest, selector_passed
from optim.preference.dpo import LOSS_TYPES, DPOConfig, dpo_terms
from optim.preference.grpo import STEP_WEIGHTINGS, group_advantages, grpo_pass, grpo_step, step_weigher
from optim.policy import DTYPES, ModelLoadError, Policy
from optim.selector.model import GATES, Selector
from optim.train_data import PickAPicPairs, RatingsPairs, collate_pairs, preference_pairs, read_prompts  # noqa: F401
from optim.trajectory import Condition, SamplingSettings
from optim.preference.update import ALGORITHMS, UpdateConfig
from optim.versions import cpu_fp32

TRACKERS = ("tensorboard", "wandb", "none")

#: ``UpdateConfig``'s fields that belong to one in-process update and mean nothing offline: a run takes
#: one optimizer step per batch for its epochs (batch_size pairs or prompts per process), trains every
#: stored step of a GRPO group, and has no trust region.
IN_PROCESS_ONLY = ("groups_per_step", "min_steps_per_pass", "kl_budget", "train_fraction", "train_window", "kl_groups",
                   "micro_batch", "balance_modalities")


# ---------------------------------------------------------------------- settings


@dataclass
class TrainConfig(UpdateConfig):
    """An offline run: the in-process update's settings (``UpdateConfig``: the algorithm, AdamW's, GRPO's
    and DPO's), with the defaults of many steps over a dataset rather than a few on the groups at hand,
    then what to train on and how to run. ``IN_PROCESS_ONLY`` fields stay at their defaults."""

    algorithm: str = "dpo"
    learning_rate: float = 1e-4  # many steps over a dataset, where an in-process update takes a few on a few groups
    weight_decay: float = 1e-2
    seed: int = 0  # a run is reproducible unless asked otherwise
    data: str | None = None  # Pick-a-Pic parquet file, or a ratings CSV (dpo)
    prompts: str | None = None  # text file, one prompt a line (grpo)
    model: str | None = None  # diffusers folder; None: the embedded model
    out: str = "checkpoints"
    epochs: int = 1  # per stage
    batch_size: int = 4  # pairs (dpo) or prompts (grpo) per process and step
    lora_rank: int = 4
    two_stage: bool = False
    selector: str | None = None  # selector folder; None: the embedded selector
    group_size: int = 4  # grpo: candidates per prompt
    steps: int = 20  # grpo: sampling steps
    guidance: float = 5.0  # grpo: classifier-free guidance while sampling
    report_to: str = "tensorboard"
    dtype: str | None = None  # frozen networks: bf16 | fp16 | fp32; None: the launch's mixed precision, else the policy's default

    def check(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.algorithm == "dpo" and not self.data:
            raise ValueError("--algorithm dpo needs --data FILE.parquet (Pick-a-Pic format) or --data RATINGS.csv")
        if self.algorithm == "grpo" and not self.prompts:
            raise ValueError("--algorithm grpo needs --prompts FILE.txt (one prompt a line)")
        if self.algorithm == "grpo" and self.selector == GATES:
            raise ValueError("GRPO's reward is the selector's quality score, and the rule gates alone (--selector gates) "
                             "give none: train a selector on your ratings (python -m workbench.selector train)")
        if self.two_stage and self.algorithm != "dpo":
            raise ValueError("--two-stage filters preference pairs: it needs --algorithm dpo")
        if self.epochs < 1 or self.batch_size < 1 or self.group_size < 2:
            raise ValueError("epochs and batch size must be at least 1, and a group at least 2 candidates")
        if self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.algorithm == "grpo":
            SamplingSettings(steps=self.steps, guidance=self.guidance).check()
        if self.report_to in TRACKERS and self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ValueError(f"--report-to {self.report_to}: {self.report_to} is not installed (pip install "
                             f"{self.report_to}), and the run would log nothing; or pass --report-to none")
        if changed := [name for name in IN_PROCESS_ONLY if getattr(self, name) != getattr(UpdateConfig, name)]:
            raise ValueError(f"{', '.join(changed)}: settings of an in-process update, which offline training does not use")

    def settings(self) -> dict:
        """The settings this run uses, as plain values (meta.json, the trackers)."""
        return {key: value for key, value in asdict(self).items() if key not in IN_PROCESS_ONLY}


# ---------------------------------------------------------------------- the run


def train(config: TrainConfig) -> Path:
    """Run the configured training; returns the run folder (the one the main process writes)."""
    config.check()
    if config.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user set WANDB_MODE
    data = read_prompts(config.prompts) if config.algorithm == "grpo" else preference_pairs(config.data)  # fail before loading
    if not len(data):  # prompts are never empty (read_prompts refuses that): no pair, and why
        rows = f"; {data.report}" if isinstance(data, RatingsPairs) else ""
        raise ValueError(f"{config.data} has no decided pair to learn from: {data.ties} ties dropped{rows}")
    trainer = Trainer(config)
    say = trainer.accelerator.print  # main process only
    say(f"{trainer.accelerator.num_processes} process(es) on {trainer.accelerator.device}; run folder {trainer.run_dir}")
    if config.algorithm == "grpo":
        say(f"{config.prompts}: {len(data)} prompts, groups of {config.group_size}")
        trainer.fit(data, list, trainer.grpo_backward, stage=1)
    else:
        if isinstance(data, RatingsPairs):
            say(f"{config.data}: {data.report}; {len(data)} pairs within prompts, {data.ties} ties dropped")
        else:
            say(f"{config.data}: {len(data) + data.ties} rows, {data.ties} ties dropped, {len(data)} pairs")
        say(f"stage 1: {len(data)} pairs")
        trainer.fit(data, collate_pairs, trainer.dpo_backward, stage=1)
        if config.two_stage:
            kept = selector_passed(trainer.accelerator, trainer.selector, data)
            say(f"stage 2: {len(kept)} of {len(data)} pairs have both images passed by the selector")
            if kept:
                trainer.fit(Subset(data, kept), collate_pairs, trainer.dpo_backward, stage=2)
    trainer.accelerator.end_training()
    return trainer.run_dir


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """One run: the accelerator, the wrapped loss, the optimizer, the run folder and the counters."""

    def __init__(self, config: TrainConfig):
        self.config = config
        # Only the main process writes, so only its timestamp names the folder.
        self.run_dir = Path(config.out) / time.strftime("%Y%m%d-%H%M%S")
        tracker = None if config.report_to == "none" else config.report_to
        self.accelerator = Accelerator(log_with=tracker, project_dir=self.run_dir,
                                       kwargs_handlers=[AutocastKwargs(enabled=False)])
        set_seed(config.seed)
        # The selector before the model (minutes for SDXL or FLUX): a folder that is not one fails fast.
        self.selector = Selector.load(config.selector) if config.two_stage or config.algorithm == "grpo" else None
        mixed = self.accelerator.mixed_precision
        self.policy = Policy.load(config.model, device=str(self.accelerator.device), lora_rank=config.lora_rank,
                                  dtype=config.dtype or (mixed if mixed in DTYPES else None))
        if self.policy.dtype == torch.float16 and self.accelerator.scaler is None:
            raise ValueError("an fp16 model needs a loss scale, or its small gradients underflow to zero: on a GPU launch "
                             "with --mixed_precision fp16 (accelerate's GradScaler); else use --dtype bf16 or fp32")
        self.parameters = self.policy.lora_parameters()
        optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(PolicyLoss(self.policy), optimizer)
        # DPO's timesteps and noise, GRPO's group seeds: one stream per process, so shards draw apart.
        self.generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self.epoch = self.global_step = 0
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True)
        self.accelerator.init_trackers("optim-train", config=tracker_config(config))

    def fit(self, dataset: Dataset, collate, backward, stage: int) -> None:
        """``config.epochs`` epochs over ``dataset``, sharded across processes, a checkpoint after each."""
        loader = DataLoader(dataset, batch_size=self.config.batch_size, shuffle=True, collate_fn=collate)
        loader = self.accelerator.prepare(loader)  # each process gets its own shard of every epoch
        with self.policy.training():  # gradient checkpointing on a GPU, as in the room's updates
            for _ in range(self.config.epochs):
                self.epoch += 1
                history = [self.optimizer_step(backward, batch) for batch in loader]
                self.save(stage, len(dataset), history)

    def optimizer_step(self, backward, batch) -> dict:
        """Gradients of one batch, clipped, then one AdamW step; the metrics averaged over processes."""
        metrics = backward(batch)
        grad_norm = self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        # The gradients are already synced, so every process sees the same norm and skips together.
        finite = bool(torch.isfinite(grad_norm))
        if finite or self.accelerator.scaler is not None:  # fp16: the scaler skips an overflowed step and halves its scale
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.tensor([*metrics.values(), float(grad_norm)], device=self.accelerator.device)
        metrics = dict(zip([*metrics, "grad_norm"], self.accelerator.reduce(values, "mean").tolist()))
        metrics["skipped_non_finite"] = float(not finite)
        self.global_step += 1
        self.accelerator.log(metrics, step=self.global_step)
        return metrics

    def dpo_backward(self, batch) -> dict:
        winners, losers, captions, weights = batch
        prompt_embeds = Condition.cat([self.policy.encode_condition(caption)[0] for caption in captions])
        terms = self.model(dpo_terms, self.policy.encode_images(winners), self.policy.encode_images(losers),
                           prompt_embeds, torch.tensor(weights, dtype=torch.float32), self.config.dpo, self.generator)
        self.accelerator.backward(terms.loss)
        return {"loss": terms.loss.item(), "implicit_accuracy": terms.accuracy, "margin": terms.margin.mean().item()}

    def grpo_backward(self, prompts: list[str]) -> dict:
        """Sample and score a group per prompt, then accumulate grpo_step's gradients over every stored
        step; DDP all-reduces once, on the last backward."""
        c = self.config
        samples = [self.policy.sample(p, n=c.group_size, seed=int(torch.randint(2**31 - 1, (), generator=self.generator)),
                                      steps=c.steps, guidance=c.guidance) for p in prompts]
        rewards = [selector_rewards(self.selector, s.images, p) for s, p in zip(samples, prompts)]

        def run_step(group, trajectory, step, rows, advantage, weight, last):
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                terms = self.model(grpo_step, trajectory, step, advantage, c.grpo, None, rows)
                self.accelerator.backward(weight * terms.loss)
            return terms

        metrics = grpo_pass([s.trajectory for s in samples], group_advantages(rewards, c.grpo), run_step,
                            step_std=step_weigher(c.grpo, self.policy))
        return {**metrics, "reward": torch.cat(rewards).mean().item()}

    def save(self, stage: int, examples: int, history: list[dict]) -> None:
        """The main process writes the epoch's adapter weights and meta.json; every process gives its digest."""
        digests = gather_object([lora_digest(self.policy.lora_state_dict())])
        if not self.accelerator.is_main_process:
            return
        folder = self.run_dir / f"epoch_{self.epoch}"
        folder.mkdir()
        save_file(cpu_fp32(self.policy.lora_state_dict()), folder / "adapter.safetensors")
        metrics = {key: sum(h[key] for h in history) / len(history) for key in history[0]}
        meta = {"epoch": self.epoch, "stage": stage, "pairs" if self.config.algorithm == "dpo" else "prompts": examples,
                "steps_per_process": len(history), "metrics": metrics, "base_model": str(self.policy.model_path),
                "replica_digests": digests, "config": self.config.settings()}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        agree = "all processes agree" if len(set(digests)) == 1 else "PROCESSES DISAGREE"
        print(f"epoch {self.epoch} (stage {stage}): loss {metrics['loss']:.4g}; wrote {folder} ({agree})")


def selector_rewards(selector: Selector, images: list[Image.Image], prompt: str) -> torch.Tensor:
    """The selector's quality for the images it passes, 0 for those it rejects: a blank image still has a
    quality score, and a broken one none, and neither may earn a reward."""
    return torch.tensor([v.quality if v.passed else 0.0 for v in selector.judge(images, prompt=prompt)])


def tracker_config(config: TrainConfig) -> dict:
    """The config flattened for trackers: tensorboard's hparams take only numbers, strings and booleans."""
    flat = {}
    for key, value in config.settings().items():
        for sub, item in (value.items() if isinstance(value, dict) else [("", value)]):
            flat[f"{key}.{sub}" if sub else key] = "" if item is None else item
    return flat


# ---------------------------------------------------------------------- command line


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    parser = argparse.ArgumentParser(prog="accelerate launch -m optim.train", description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", choices=ALGORITHMS, default=d.algorithm)
    parser.add_argument("--data", help="Pick-a-Pic-format parquet file, or a ratings CSV (dpo)")
    parser.add_argument("--prompts", help="text file, one prompt a line (grpo)")
    parser.add_argument("--model", help="local diffusers folder (default: the embedded model)")
    parser.add_argument("--out", default=d.out, help=f"checkpoint root (default {d.out})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="epochs (per stage with --two-stage)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs or prompts per process and step")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank)
    parser.add_argument("--beta", type=float, default=d.dpo.beta, help="DPO beta, with the paper's 0.5 factor")
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default=d.dpo.loss_type)
    parser.add_argument("--two-stage", action="store_true", help="then train again on selector-passed pairs only")
    parser.add_argument("--selector", help="selector folder (default: the embedded selector); 'gates' for the rule "
                        "gates alone (--two-stage only: GRPO's reward is the selector's quality)")
    parser.add_argument("--group-size", type=int, default=d.group_size, help="grpo: candidates per prompt")
    parser.add_argument("--steps", type=int, default=d.steps, help="grpo: sampling steps")
    parser.add_argument("--guidance", type=float, default=d.guidance, help="grpo: guidance while sampling")
    parser.add_argument("--step-weighting", choices=STEP_WEIGHTINGS, default=d.grpo.step_weighting,
                        help="grpo: spread each group's weight over the denoising steps evenly, or by each step's "
                             "noise std (every step is trained here, and unweighted the last, narrowest ones "
                             "carry most of the gradient)")
    parser.add_argument("--report-to", choices=TRACKERS, default=d.report_to)
    parser.add_argument("--dtype", choices=list(DTYPES), default=d.dtype,
                        help="frozen networks' precision (default: the launch's --mixed_precision, else bf16/fp16 on a GPU, "
                             "fp32 on a CPU)")
    args = vars(parser.parse_args(argv))
    dpo = DPOConfig(beta=args.pop("beta"), loss_type=args.pop("loss_type"))
    grpo = replace(d.grpo, step_weighting=args.pop("step_weighting"))
    return TrainConfig(**args, dpo=dpo, grpo=grpo)


def main(argv=None) -> int:
    config = parse_args(argv)
    try:
        train(config)
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

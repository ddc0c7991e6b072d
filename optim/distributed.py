"""What data-parallel offline training needs beyond accelerate: the loss as one DDP module, the
replicas' agreement, and judging a dataset in shards (``optim.train`` runs them under ``accelerate launch``).
"""

from __future__ import annotations

import hashlib

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import Dataset

from optim.policy import Policy
from optim.selector.model import Selector
from optim.versions import cpu_fp32


class PolicyLoss(torch.nn.Module):
    """A loss of the policy (``dpo_terms``, ``grpo_step``) run as a module whose parameters are the denoiser's
    (the UNet, or a flow model's transformer).

    Why: DDP syncs gradients only for a backward whose forward went through the DDP wrapper, and both
    losses make two UNet passes per forward, the policy's and the reference's (the SAME UNet with its
    adapters disabled by ``policy.reference()``). Wrapping the UNet alone would send one pass through DDP
    and the other around it; wrapping the whole loss keeps ``dpo_terms`` and ``grpo_step`` untouched and
    gives DDP one forward per backward. Frozen weights have ``requires_grad`` False, so DDP syncs only the
    adapters. ``policy`` is a plain attribute, so the VAE and text encoder are not registered here.
    """

    def __init__(self, policy: Policy):
        super().__init__()
        self.denoiser = policy.denoiser  # the UNet, or a flow model's transformer
        self.policy = policy

    def forward(self, loss, *args):
        return loss(self.policy, *args)


def lora_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of adapter weights: every process of a data-parallel run must report the same one."""
    digest, weights = hashlib.sha256(), cpu_fp32(weights)
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].numpy().tobytes())
    return digest.hexdigest()


def selector_passed(accelerator: Accelerator, selector: Selector, pairs: Dataset) -> list[int]:
    """Indices of the pairs whose both images the selector passes against the caption, judged in shards."""
    with accelerator.split_between_processes(list(range(len(pairs)))) as mine:
        kept = []
        for i in mine:
            winner, loser, caption, _ = pairs[i]
            if all(verdict.passed for verdict in selector.judge([winner, loser], prompt=caption)):
                kept.append(i)
    return sorted(gather_object(kept))

"""Who ranks: an expert's role and level, defined once for the accounts file, the store and the losses.

- A role says what someone may do: an ``expert`` ranks and judges; an ``admin`` also applies
  updates, rolls back, imports ratings and exports datasets (``workbench.api``).
- A level (1-3) is how much an expert's votes weigh: a loss WEIGHT equal to the level, never a
  change of label (``optim.preference.rewards.level_weight``). It is stored with each ranking, rating and A/B
  judgement, so a later promotion does not rewrite history.
"""

ROLES = ("expert", "admin")
LEVELS = (1, 2, 3)

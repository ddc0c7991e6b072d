"""Learning from the experts' preferences: rankings to rewards (``rewards.py``), a ranked group
(``groups.py``), GRPO (``grpo.py``) and Diffusion-DPO (``dpo.py``), applying an update with its guards
(``update.py``), the numbers the page shows (``losses.py``), the reward model learned from the rankings
(``reward_model.py``) and the experts' agreement (``agreement.py``)."""

"""Moved to ``optim/preference/losses.py``; the names earlier READMEs showed stay importable from here."""

from optim.preference.losses import group_losses  # noqa: F401

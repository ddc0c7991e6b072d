"""Moved to ``optim/preference/update.py``; the names earlier READMEs showed stay importable from here."""

from optim.preference.update import LossScale, UpdateConfig, UpdateResult, apply_update  # noqa: F401

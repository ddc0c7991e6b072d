"""Moved to ``optim/preference/groups.py``; the names earlier READMEs showed stay importable from here."""

from optim.preference.groups import RankedGroup  # noqa: F401

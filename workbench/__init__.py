"""The product people touch: the control room's page and, later, its rounds of ranking."""

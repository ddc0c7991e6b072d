"""The product people touch: the control room (``ControlRoom``), its page, the sampler and the selector's CLI.

``ControlRoom`` and ``RoomConfig`` are imported on first use (PEP 562), so that small commands such
as ``python -m workbench.auth add-user`` start without loading torch and the model code.
"""

__all__ = ["ControlRoom", "RoomConfig"]


def __getattr__(name: str):
    if name in __all__:
        from workbench import room

        return getattr(room, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")

"""The product people touch: the control room (``ControlRoom``), its page, the sampler and the selector's CLI."""

from workbench.room import ControlRoom, RoomConfig

__all__ = ["ControlRoom", "RoomConfig"]

"""chatd: one WebSocket chat daemon, five JSON chat protocols, on trio."""

__version__ = "0.1.0"

"""The offload release; both sides compare it at the handshake."""

__version__ = "0.1.0"

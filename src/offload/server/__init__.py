"""The worker server (``offload serve``): authenticated remote clients, isolated calls.

It depends on the client side (its pool of child workers is an ``Engine``) and on the
transport; nothing depends on it but the CLI.
"""

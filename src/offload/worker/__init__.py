"""The worker side: what runs inside a worker process. Imports nothing from the client."""

"""The client side: futures, worker handles, the scheduler and its driver."""

"""Byte streams and the I/O loop that drives them (socketpairs now; TCP, Unix and TLS
for remote workers)."""

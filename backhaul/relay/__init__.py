"""Relays: move one user connection's bytes through its link until both directions end.

``splice`` joins two sockets (fd to fd, the fast path); ``stream`` joins a socket to a stream
link (an smux stream, a WebSocket) with bounded buffers and backpressure both ways.
"""

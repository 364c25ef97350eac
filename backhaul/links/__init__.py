"""Link kinds: what carries one user connection through the tunnel when it is not a socket of
its own (``websocket``: a WebSocket on the reactor, whole messages or a byte stream).
"""

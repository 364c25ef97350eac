"""Link kinds: what carries one user connection (or one UDP flow) through the tunnel, on either
side: ``socket`` a plain TCP socket, spliced (tcp); ``websocket`` a WebSocket, whole messages or
a byte stream (ws, wss); ``smux_stream`` a stream of an smux session (tcpmux, wsmux); ``udp_flow``
a UDP 5-tuple to the tunnel port (udp).
"""

"""UDP on the reactor: sockets and peers (``sockets``), the server's public UDP ports and their
flows (``ports``), and the relays of a flow's datagrams (``relay``).
"""

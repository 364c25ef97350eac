"""smux sessions at run time: ``session`` runs one smux session (protocol/smux.py) on a connected
socket, with its demux thread, its frames out and its streams as links. A session and its streams
share one module: the session makes each stream, and each stream reads and writes through its
session.
"""

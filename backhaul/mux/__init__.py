"""smux sessions at run time: ``session`` runs one smux session (protocol/smux.py) on a connected
socket, with its demux thread, its frames out and its streams as links.
"""

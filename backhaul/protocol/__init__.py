"""Pure codecs of the Backhaul wire protocol: bytes in, values or events out, no sockets."""

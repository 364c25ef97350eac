"""Backhaul: a reverse tunnel through NAT and firewalls, wire-compatible with Backhaul v0.7.2."""

__version__ = "0.1.0"

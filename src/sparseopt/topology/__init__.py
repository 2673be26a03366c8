"""Topologies: static masks, SET and RigL, and their update schedule."""

from sparseopt.topology.base import Static, Topology
from sparseopt.topology.dst import SET, RigL
from sparseopt.topology.pai import pai_scores, prune_at_init
from sparseopt.topology.schedules import UpdateSchedule

__all__ = ["RigL", "SET", "Static", "Topology", "UpdateSchedule", "pai_scores", "prune_at_init"]

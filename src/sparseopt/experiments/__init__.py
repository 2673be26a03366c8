"""Experiment plumbing on top of the core: config/ (what a run is), run/ (doing one), report/ (comparing them),
studies/ (grids and studies of many runs)."""

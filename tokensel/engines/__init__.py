"""Execution engines for `compress`: the local loop lives in tokensel.compress; Ray Data in ray_engine."""

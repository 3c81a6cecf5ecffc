"""Compress a catalogue file: the job around the Selector (job.py), the local engine (local.py), the
Ray Data engine (ray.py), the score cache (cache.py) and the read-ahead / write-behind threads (threads.py)."""

"""Export: a run's experts as a folder diffusers loads (folder.py) with the routing pipeline
copied beside them (pipeline.py, which imports torch and diffusers only)."""

"""Export: a run's experts as a folder diffusers loads (folder.py: each backbone as a model,
components.py; the encoders that made the shards, text.py; LoRA experts also as diffusers LoRA
files, lora.py) with the code the folder needs copied beside them (pipeline.py + ediff_text.py +
ediff_lora.py, models.py, clip_text.py: torch and diffusers only)."""

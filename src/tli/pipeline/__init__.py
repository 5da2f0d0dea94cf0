"""The pipeline of ``tli run``: run config and presets, run directory, runner."""

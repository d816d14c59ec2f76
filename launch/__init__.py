"""Launchers: the end-to-end pipeline (``python -m launch.pipeline``) and per-accelerator scripts."""

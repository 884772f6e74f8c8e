"""Checkpoints: the layout and manifests, the stage files, what a stage saves and restores."""

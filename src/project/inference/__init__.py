"""Standalone inference runtime: numpy, torch and onnxruntime only (no Lightning, Hydra, uproot)."""

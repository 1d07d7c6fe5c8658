"""Fused fast paths for delta wrappers on frozen layers: one file per method, shared helpers apart."""

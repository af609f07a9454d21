"""Operator tools: write a cluster config, run a cluster on one machine, watch it live."""

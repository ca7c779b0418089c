"""Laptop/CI scaffolding: a CPU platform for verl, the `hf` rollout backend, the embedded tiny pair."""

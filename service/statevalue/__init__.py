"""statevalue: per-token state values (Numca, Hista, group mean) for LLM reinforcement learning."""

__version__ = "0.1.0"

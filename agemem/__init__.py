"""agemem: train LLM agents to manage their own memory with RL (AgeMem), as a Prefect pipeline."""

__version__ = "0.1.0"

"""Fixtures for the agent tests (a pytest plugin listed in conftest.py)."""

"""Runnable examples of the event bus (``python -m examples.dashboard.run``)."""

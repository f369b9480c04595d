"""Runnable example models for dualsn (frameworks are imported only by the factories)."""

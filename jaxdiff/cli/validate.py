"""Checks a whole config before anything is written or trained (filled in by the CLI work)."""

from __future__ import annotations


def check_config(config):
    """Raises ValueError (one line, naming the key, the bad value and what is allowed) for any
    setting that would fail or silently misbehave later in training or sampling."""

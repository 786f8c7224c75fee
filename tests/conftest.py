"""Shared fixtures: a small phantom store built once per test session; quiet offline Comet."""

import os

import pytest

# comet_ml must never reach the network or patch the interpreter in tests.
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ["COMET_START_ONLINE"] = "false"
os.environ.pop("COMET_API_KEY", None)

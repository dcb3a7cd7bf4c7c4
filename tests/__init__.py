"""Lets single test files run as `python -m unittest tests.test_relay` from the repository root."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

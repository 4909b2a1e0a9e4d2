"""Helpers shared by tests: media made in code (`tests.helpers.media`)."""

"""Helpers shared by tests: media made in code (`tests.helpers.media`), the parity fixtures and
comparing against them (`tests.helpers.parity`)."""

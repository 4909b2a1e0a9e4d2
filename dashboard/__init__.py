"""The read-only live dashboard: a Starlette app over the daemon's ledger and outbox (docs/dashboard.md)."""

"""Results: the append-only point log, the tidy table, run metadata."""

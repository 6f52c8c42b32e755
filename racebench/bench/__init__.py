"""The measurement engine: sweep specs, isolated workers, the runner."""

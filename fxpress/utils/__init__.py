"""Small helpers that depend only on fxpress.errors."""

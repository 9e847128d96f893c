"""HTTP routes, one module per resource: health, models, sessions, metrics."""

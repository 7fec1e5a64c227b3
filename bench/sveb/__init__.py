"""SVEB-style value-estimation accuracy benchmark on the embedded model."""

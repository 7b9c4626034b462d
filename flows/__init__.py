"""Prefect flows and tasks: thin wrappers that call `dalle_pipeline.components`."""

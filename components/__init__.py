"""Pipeline stages as plain Python/PyTorch: nothing here imports Prefect."""

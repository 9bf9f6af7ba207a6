"""Running the stage graph: locally in sequence, or as a chain of Slurm jobs."""

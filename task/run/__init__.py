"""A run's life: config and schema, the door, launch, sweep, run folder and outputs."""

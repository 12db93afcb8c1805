"""What every pflower method shares: config, data, models, training loops, state, outputs."""

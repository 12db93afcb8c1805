"""The plumbing every method and the engine use: parameters, personal state, device, training, models."""

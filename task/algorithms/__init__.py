"""Method math as pure functions: robust aggregation, low rank, mutual learning, trade-offs, ARI."""

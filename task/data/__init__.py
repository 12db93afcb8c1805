"""Data: sources on disk, partitioners, the federation in memory, the node cache."""

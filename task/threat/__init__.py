"""The simulated threat model: Byzantine clients, client-side and server-side attacks."""

"""A node's life: start, hear events, schedule runs, stay visible (heartbeat, health, metrics), stop."""

"""Memory: what a load will take (plan), who holds what (manager), and batched sessions (scheduler)."""

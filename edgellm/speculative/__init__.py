"""Speculative decoding: drafters, verification with KV rollback, a cost-aware adaptive policy."""

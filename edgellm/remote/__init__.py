"""A model split across RPC workers is held by a child process (host.py), so that a worker that goes away
ends the child, not the app: the parent (split.py) keeps every reply's text and goes on without it."""

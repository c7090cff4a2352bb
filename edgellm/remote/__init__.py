"""A model split across RPC workers runs in a supervised child process (child.py), so that a worker that goes
away ends the child, not the app: the parent (supervisor.py) keeps the reply and goes on without it."""

"""Tool calls: the tools a request declares (declare), how they reach the model's prompt (prompt), the
grammar that forces a call (force), and the reply read back into calls (parse, watch)."""

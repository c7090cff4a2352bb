"""Caps on what one request may ask for: a local server still meets hostile or broken clients."""

MAX_BODY_BYTES = 4 << 20  # a request body; a 128k-token prompt is ~0.5 MiB of text
MAX_MESSAGES = 1024
MAX_STOPS = 16
MAX_TOKENS = 32768  # max_tokens / num_predict; the slot's context caps it further

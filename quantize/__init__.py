"""HF checkpoint -> low-bit GGUF (the `edgellm quantize` pipeline; see issue #4)."""

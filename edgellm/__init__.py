"""edgellm: local LLM runtime, quantizer and chat for laptops and edge boxes."""
__version__ = "0.1.0"

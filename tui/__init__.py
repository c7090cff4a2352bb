"""The Textual chat app (`edgellm chat` on a terminal)."""

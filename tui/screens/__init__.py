"""The app's screens: chat, models, quantize, help."""

"""Serving: an exported Hugging Face folder behind an OpenAI-compatible Ray Serve application."""

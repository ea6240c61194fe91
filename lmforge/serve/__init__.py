"""Serving: an OpenAI-compatible HTTP server (``app``) over a continuous-batching engine (``engine``), and a
chat page (``static/``)."""

"""Serving a model: the OpenAI-compatible app (app.py) and the web chat page (static/).

Modules: app (routes, security), protocol (the accepted fields, OpenAI errors), scheduler (the thread
that owns the decoding engine), generation (events to text and logprobs), responses (OpenAI's JSON
and SSE shapes).
"""

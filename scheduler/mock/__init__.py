"""Built-in OpenAI-compatible mock server that enforces rate limits."""

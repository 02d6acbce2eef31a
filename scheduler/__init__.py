"""scheduler: asyncio request scheduler for OpenAI-compatible LLM APIs."""

"""`edgepack serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, extra [serve]) over runtime/."""

# The example app (and its stand-in upstream and load generator) for docker-compose.yml.
# Build context: the repository root (`context: ..` in docker-compose.yml).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv

COPY pyproject.toml README.md ./
COPY asgi_perfmon ./asgi_perfmon
RUN pip install ".[asyncpg]" fastapi uvicorn aiohttp

COPY example_app ./example_app

USER nobody
EXPOSE 8000
CMD ["uvicorn", "example_app.main:app", "--host", "0.0.0.0", "--port", "8000"]

# keychain-warmer: the worker, the CLI and the local Secret Manager test server in one image.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home keychain
WORKDIR /app
COPY pyproject.toml README.md ./
COPY keychain keychain
COPY streams streams
# development and demo tooling (not installed): the compose demo's pubsub-init and producer run it from /app
COPY devtools devtools
RUN pip install --no-cache-dir '.[streams]' && python -c "import keychain, streams.app"
USER 10001
ENV KEYCHAIN_DATA_DIR=/tmp/keychain-warmer PYTHONUNBUFFERED=1
EXPOSE 6066
ENTRYPOINT ["python", "-m", "streams"]
CMD ["worker"]

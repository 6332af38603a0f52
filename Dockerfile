# The bot as a container: `docker build -t dcbot .` then `docker run --env-file .env dcbot`
# (compose.yaml runs it beside Redis). No secret is baked in: settings come from the
# environment at run time, and .dockerignore keeps .env out of the build context.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SQLITE_PATH=/data/sessions.sqlite3

WORKDIR /app
# The bot runs as this user; /data is where it may write (the SQLite file when REDIS_URL is
# empty: mount a volume there to keep it).
RUN useradd --create-home --uid 10001 bot && mkdir /data && chown bot /data

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt \
    && rm requirements.txt

COPY README.md ./
COPY bot ./bot
RUN pip install --no-cache-dir --no-deps .

USER 10001
VOLUME ["/data"]

CMD ["python", "-m", "bot"]

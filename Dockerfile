# One image for every service: scraper, workers, beat, flower, migrate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WAIFU_DATA_DIR=/data

# libgomp for OpenCV/TensorFlow, tini as PID 1 so SIGTERM reaches Celery for a warm shutdown
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY core ./core
COPY scraper ./scraper
COPY download ./download
COPY detect ./detect
COPY crop ./crop
COPY train ./train
COPY predict ./predict
COPY worker ./worker
COPY db ./db
COPY waifu ./waifu
RUN pip install ".[train,flower]"

RUN useradd --create-home --uid 10001 waifu && mkdir -p /data && chown waifu:waifu /data
USER waifu
VOLUME ["/data"]

# a process of ours answers: the database is reachable and migrated, the broker answers
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["waifu", "healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["waifu", "--help"]

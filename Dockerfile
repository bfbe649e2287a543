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

# Dependencies first, at the versions and hashes of deploy/requirements.lock (`make lock` writes it from
# pyproject.toml): this 2 GB layer is rebuilt when the lock changes, not with every change of our code.
# TensorFlow's C++ headers (290 MB) serve only to compile custom ops: not in a server image.
COPY deploy/requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --no-deps -r /tmp/requirements.lock \
    && rm -rf "$(python -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("tensorflow").origin))')/include" \
    && rm /tmp/requirements.lock

COPY pyproject.toml README.md ./
COPY core ./core
COPY scraper ./scraper
COPY download ./download
COPY detect ./detect
COPY crop ./crop
COPY labels ./labels
COPY train ./train
COPY predict ./predict
COPY worker ./worker
COPY db ./db
COPY waifu ./waifu
# our code alone; `pip check` fails the build when the lock no longer satisfies pyproject.toml
RUN pip install --no-deps ".[train,flower]" && pip check

RUN useradd --create-home --uid 10001 waifu && mkdir -p /data && chown waifu:waifu /data
USER waifu
VOLUME ["/data"]
# big freed blocks (decoded pictures) go back to the system: long-lived workers keep a flat memory (core/memory.py)
ENV MALLOC_MMAP_THRESHOLD_=4194304 MALLOC_ARENA_MAX=2

# a process of ours answers: the database is reachable and migrated, the broker answers. It takes about
# 1 s of CPU (Python start-up and imports); 30 s (Docker's default) leaves room on a busy 2-core host,
# where 10 s ran out while the cpu workers and other containers' checks competed for the cores.
HEALTHCHECK --interval=30s --timeout=30s --start-period=30s --retries=3 \
    CMD ["waifu", "healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["waifu", "--help"]

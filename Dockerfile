# The bridge as a container: gunicorn serving app.py and its bridge/ package, configured by the environment and config.yaml.
# It holds no config.yaml: mount the folder that holds yours at /config (a folder, never the file
# alone: see docs/operations.md#the-container for `docker run` and why). Without it, it refuses to
# start, naming CONFIG_PATH.

# The base image, by tag (for people) and by digest (what is pulled): the digest of the tag's
# multi-architecture index. To update it: pick the new tag, then
#   docker buildx imagetools inspect python:3.11.X-slim-bookworm   (the "Digest:" line)
# and replace both FROM lines, tag and digest together (docs/development.md#supply-chain).

# Build stage: the pinned dependencies, every file checked against its sha256 in requirements.txt,
# into a venv. Wheels only: nothing is compiled, and no sdist's build backend (whose own
# dependencies pip would not hash-check) runs. Only the venv, without pip, reaches the image.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /build/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r /build/requirements.txt \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# The image: the base Python (no compiler on slim), minus its installer and build backends.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PORT=8080 \
    CONFIG_PATH=/config/config.yaml \
    STATE_PATH=/var/lib/bridge/bridge.sqlite3

# No pip, setuptools or wheel; the service's user; the ledger's folder, owned by that user (a named
# volume mounted there starts out with the same owner).
RUN /usr/local/bin/python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin bridge \
    && install --directory --owner=10001 --group=10001 --mode=0700 /var/lib/bridge
COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY app.py gunicorn.conf.py ./
COPY bridge/ ./bridge/
USER 10001:10001
VOLUME ["/var/lib/bridge"]

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]
CMD ["gunicorn", "--config", "gunicorn.conf.py"]

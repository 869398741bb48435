# dualwrite sidecar image: build the wheel (with its C frame scanner) in one stage, run it slim
# and unprivileged in the next. The config is mounted at /etc/dualwrite/dualwrite.yaml.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY dualwrite ./dualwrite
COPY proxy ./proxy
COPY compare ./compare
COPY lint ./lint
COPY mirror ./mirror
COPY core ./core
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dualwrite
USER 10001
# 6432: the proxy (the application's DSN points here); 9187: /metrics, /healthz, /readyz, /status
EXPOSE 6432 9187
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9187/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["dualwrite", "run", "--config", "/etc/dualwrite/dualwrite.yaml"]

# KubeCI service image: `docker build -t kubeci .`, then `docker run -p 8080:8080 kubeci`.

# Stage 1: build KubeCI's wheel and the wheels of its dependencies.
FROM python:3.12-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY pipelines_schema ./pipelines_schema
RUN python -m build --wheel --outdir /wheels . \
    && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/kubeci-*.whl

# Stage 2: install the wheels into a slim runtime, with no build tools.
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KUBECI_HOST=0.0.0.0 \
    KUBECI_PORT=8080 \
    KUBECI_DATA_DIR=/var/lib/kubeci
RUN groupadd --system --gid 10001 kubeci \
    && useradd --system --uid 10001 --gid kubeci --home-dir /var/lib/kubeci --create-home \
       --shell /usr/sbin/nologin kubeci
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels kubeci \
    && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /var/lib/kubeci
EXPOSE 8080
ENTRYPOINT ["kubeci"]
CMD ["serve"]

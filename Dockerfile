# Worker image for docker-compose.yml. Models are mounted read-only at /models; nothing is downloaded at run time.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ragq ragq
COPY workers workers
COPY tasks tasks
COPY scheduler scheduler
COPY migrations migrations
RUN pip install --no-cache-dir .
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CMD ["ragq", "worker", "--device", "all"]

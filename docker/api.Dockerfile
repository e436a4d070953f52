# API image: no CUDA. Build from the repo root: docker build -f docker/api.Dockerfile -t studio-api .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY workers workers
COPY migrations migrations
COPY config config
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir .
RUN useradd --create-home studio
USER studio
EXPOSE 8000
CMD ["studio", "api", "--host", "0.0.0.0", "--port", "8000"]

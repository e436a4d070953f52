# GPU worker image (CUDA). docker build -f docker/worker.Dockerfile -t studio-worker .
# Run one container per GPU group: docker run --gpus '"device=0,1"' studio-worker \
#     studio worker --queue train.h100 --gpus 0,1
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY workers workers
COPY migrations migrations
COPY config config
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir '.[gpu]'
RUN useradd --create-home studio
USER studio
CMD ["studio", "worker", "--queue", "train.h100", "--gpus", "0"]

"""Typed messages between the API, the workers and the trainer child: one model per boundary.

- `training`: the Celery train message, the hyperparameters a request may set and the run config the
  trainer child reads (one vocabulary);
- `events`: status events of the experiment log and the trainer's own events the supervisor acts on;
- `inference`: the generation and scoring requests sent to the inference queue, and the replies back.
"""

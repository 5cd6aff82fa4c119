"""The registry model's code (MLflow models-from-code: this file is copied into every logged model
and run when the model loads; the agent itself lives in :mod:`agemem.tracking.agent_model`)."""

import mlflow

from agemem.tracking.agent_model import AgememAgent

mlflow.models.set_model(AgememAgent())

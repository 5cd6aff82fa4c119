"""Preflight: does this machine have what a run needs? One result per requirement, each miss with its fix.

``run_checks(settings, backend)`` returns :class:`Check` results (never raises); ``require`` raises
:class:`PreflightError` with the report when something a run needs is missing, so a verl launch
stops with a readable list instead of a traceback minutes into Ray start-up. ``agemem doctor``
prints the report. What is checked:

- every backend: the Milvus URI, the MLflow URI, a DashScope key where a DashScope backend is chosen;
- verl: CUDA GPUs, the packages against verl 0.9.1's tested stack (vllm 0.24.0, TransferQueue,
  flash-attn or the sdpa fallback), the model reachable or cached, disk for the checkpoints kept,
  and for ``ray job submit`` the ``ray`` CLI, the Ray address, a tracking server (not sqlite) and a
  tool server the cluster can reach.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlparse

from agemem.settings import LLMSettings, Settings

Status = Literal["ok", "warn", "fail"]

#: verl 0.9.1's tested GPU stack (its ``vllm`` extra) and the TransferQueue its V1 trainer imports.
VERL_STACK: dict[str, str] = {"verl": "0.9.1", "vllm": "0.24.0", "TransferQueue": "0.1.11"}
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    """One requirement: ``fail`` stops a run, ``warn`` is worth knowing, ``fix`` says what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.status]
        return f"{mark} {self.name}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix and self.status != "ok" else "")


class PreflightError(RuntimeError):
    """A run was refused before it started; the message is the doctor's report of what is missing."""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _reachable(host: str, port: int) -> str | None:
    """None when a TCP connection opens, else why not."""
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def _endpoint(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"tcp://{url}")
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


# ------------------------------------------------------------------------------------- every backend
def check_milvus(settings: Settings) -> Check:
    uri = settings.memory_uri
    if uri.startswith(("http://", "https://", "tcp://")):
        host, port = _endpoint(uri, 19530)
        why = _reachable(host, port)
        if why:
            return Check("milvus", "fail", f"{uri} unreachable ({why})",
                         "start Milvus (infra/) or point memory.uri at a milvus-lite file")
        return Check("milvus", "ok", f"{uri} reachable")
    if importlib.util.find_spec("milvus_lite") is None:
        return Check("milvus", "fail", f"milvus-lite is not installed for {uri}", "pip install 'pymilvus[milvus-lite]'")
    parent = Path(uri).parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        return Check("milvus", "fail", f"{parent} is not writable for {uri}", "set memory.uri to a writable path")
    return Check("milvus", "ok", f"milvus-lite file {uri}")


def check_mlflow(settings: Settings, backend: str) -> Check:
    uri = settings.tracking_uri
    cluster = backend == "verl" and settings.train.ray_address is not None
    if uri.startswith("sqlite:"):
        if cluster:
            return Check("mlflow", "fail", f"{uri} is a file on this machine: verl on the cluster cannot log to it "
                         "(it carries on without tracking)", "run `mlflow server` and set MLFLOW_TRACKING_URI to it")
        return Check("mlflow", "ok", uri)
    if uri.startswith(("http://", "https://")):
        host, port = _endpoint(uri, 443 if uri.startswith("https") else 80)
        why = _reachable(host, port)
        if why:
            return Check("mlflow", "fail", f"{uri} unreachable ({why}): verl would train without tracking",
                         "start the MLflow server or fix MLFLOW_TRACKING_URI")
        return Check("mlflow", "ok", f"{uri} reachable")
    return Check("mlflow", "ok", uri)


def check_dashscope(settings: Settings) -> Check:
    sections: dict[str, LLMSettings] = {"llm": settings.llm, "judge": settings.judge}
    using = [name for name, section in sections.items() if section.backend == "dashscope"]
    if settings.eval.policy == "dashscope":
        using.append("eval")
    missing = [name for name in using if name != "eval" and settings.secret_for(sections[name]) is None]
    if "eval" in using and settings.eval.api_key is None and settings.dashscope_api_key is None:
        missing.append("eval")
    if not using:
        return Check("dashscope", "ok", "no DashScope backend chosen")
    if missing:
        return Check("dashscope", "fail", f"no API key for the DashScope backend of {', '.join(missing)}",
                     "export DASHSCOPE_API_KEY=... (or set <section>.api_key)")
    return Check("dashscope", "ok", f"key present for {', '.join(using)}")


# ---------------------------------------------------------------------------------------------- verl
def check_gpus(settings: Settings) -> Check:
    want = settings.train.n_gpus_per_node
    try:
        import torch
    except ImportError:
        return Check("gpus", "fail", "torch is not installed", "scripts/setup.sh")
    if not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no device visible"
        return Check("gpus", "fail", f"no CUDA GPU (torch {torch.__version__}, {build}); verl's rollout needs "
                     "NVIDIA GPUs", "run on a GPU node; scripts/setup.sh there installs the CUDA stack")
    have = torch.cuda.device_count()
    if have < want:
        return Check("gpus", "fail", f"{have} CUDA GPUs visible, train.n_gpus_per_node={want}",
                     f"--set train.n_gpus_per_node={have} or check CUDA_VISIBLE_DEVICES")
    return Check("gpus", "ok", f"{have} CUDA GPUs (CUDA {torch.version.cuda})")


def check_packages(settings: Settings) -> list[Check]:
    out: list[Check] = []
    wanted = dict(VERL_STACK)
    if settings.train.rollout_engine != "vllm":
        wanted.pop("vllm")
        wanted["sglang"] = "0.5.12"
    for dist, version in wanted.items():
        have = _version(dist)
        if have is None:
            out.append(Check(dist, "fail", f"not installed (verl 0.9.1 is tested with {dist}=={version})",
                             "on the GPU machine: scripts/setup.sh (installs .[gpu] with constraints-gpu.txt)"))
        elif have.split("+")[0] != version:
            out.append(Check(dist, "warn", f"{have} installed, verl 0.9.1 is tested with {version}",
                             f"pip install -c constraints-gpu.txt {dist}=={version}"))
        else:
            out.append(Check(dist, "ok", have))
    flash = _version("flash-attn")
    chosen = settings.train.attn_implementation
    if flash is None and chosen == "flash_attention_2":
        out.append(Check("flash-attn", "fail", "train.attn_implementation=flash_attention_2 but flash-attn is absent",
                         "pip install flash-attn==2.8.3 --no-build-isolation, or --set train.attn_implementation=sdpa"))
    elif flash is None:
        out.append(Check("flash-attn", "warn", f"not installed: attention falls back to {chosen if chosen != 'auto' else 'sdpa'} "
                         "(slower, more memory)", "pip install flash-attn==2.8.3 --no-build-isolation"))
    else:
        out.append(Check("flash-attn", "ok", flash))
    return out


def check_model(settings: Settings) -> Check:
    model = settings.train.model
    if model == "tiny-random-qwen2" or Path(model).expanduser().exists():
        return Check("model", "ok", f"{model} (local)")
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
    except ImportError:
        return Check("model", "fail", "huggingface_hub is not installed", "scripts/setup.sh")
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return Check("model", "ok", f"{model} in the Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return Check("model", "fail", f"{model} is not cached and HF_HUB_OFFLINE=1",
                     f"huggingface-cli download {model} (or unset HF_HUB_OFFLINE, or give a local path)")
    try:
        HfApi().model_info(model, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not reachable"; the message says which
        return Check("model", "fail", f"{model} is not cached and the hub is unreachable ({type(exc).__name__})",
                     f"huggingface-cli download {model} where the hub is reachable, or set train.model to a path")
    return Check("model", "ok", f"{model} on the hub (downloaded once at launch)")


def _weights_bytes(model: str) -> int | None:
    path = Path(model).expanduser()
    if not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except ImportError:
            cached = None
        path = Path(cached).parent if isinstance(cached, str) else path
    files = list(path.glob("*.safetensors")) + list(path.glob("*.bin")) if path.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def check_disk(settings: Settings) -> Check:
    t = settings.train
    root = settings.path(t.output_dir)
    while not root.exists():
        root = root.parent
    free = shutil.disk_usage(root).free
    weights = _weights_bytes(t.model) or 16 * 2**30  # unknown: a 7B model in bf16 is ~15 GB
    # verl saves the FSDP model shards (the base too) plus optimizer state: its LoRA share is small.
    per_ckpt = int(weights * (1.2 if t.lora_rank > 0 else 4.0))
    kept = t.keep_checkpoints or max(1, t.total_steps // t.save_every)
    need = per_ckpt * kept + weights  # + the merged model
    detail = f"{free / 2**30:.0f} GiB free at {root}, ~{need / 2**30:.0f} GiB for {kept} checkpoints + the merge"
    if free < need:
        return Check("disk", "fail", detail, "free space, move train.output_dir, or lower train.keep_checkpoints")
    return Check("disk", "ok", detail)


def check_ray(settings: Settings) -> list[Check]:
    address = settings.train.ray_address
    if address is None:
        return [Check("ray", "ok", "local Ray (started by verl)")]
    out: list[Check] = []
    if shutil.which("ray") is None:
        out.append(Check("ray", "fail", "`ray` is not on PATH (needed for `ray job submit`)",
                         "activate the environment that has ray, or add its bin/ to PATH"))
    host, port = _endpoint(address, 8265)
    why = _reachable(host, port)
    out.append(Check("ray-address", "fail", f"{address} unreachable ({why})", "start the Ray head (ray start --head) "
                     "or fix train.ray_address") if why else Check("ray-address", "ok", f"{address} reachable"))
    server = settings.memory.server_url
    if server is None or (urlparse(server).hostname or "") in _LOOPBACK:
        out.append(Check("tool-server", "fail", "the memory tool server would listen on this machine's loopback, "
                         "which cluster workers cannot reach", "run `agemem serve-tools --host 0.0.0.0` with "
                         "memory.server_token on a reachable node and set memory.server_url"))
    return out


def run_checks(settings: Settings, backend: str | None = None) -> list[Check]:
    """Every requirement of a ``backend`` run (default ``train.backend``); never raises."""
    backend = backend or settings.train.backend
    checks = [check_milvus(settings), check_mlflow(settings, backend), check_dashscope(settings)]
    if backend == "verl":
        steps: list[Callable[[Settings], Check | list[Check]]] = [
            check_gpus, check_packages, check_model, check_disk, check_ray]
        for step in steps:
            result = step(settings)
            checks.extend(result if isinstance(result, list) else [result])
    return checks


def report(checks: list[Check]) -> str:
    failed = sum(c.status == "fail" for c in checks)
    summary = f"{failed} of {len(checks)} requirements missing" if failed else f"all {len(checks)} requirements met"
    return "\n".join([c.line() for c in checks] + [summary])


def require(settings: Settings, backend: str | None = None) -> list[Check]:
    """The checks, or :class:`PreflightError` with the report when any fails."""
    checks = run_checks(settings, backend)
    if any(c.status == "fail" for c in checks):
        raise PreflightError("preflight failed (agemem doctor):\n" + report(checks))
    return checks


__all__ = ["Check", "PreflightError", "VERL_STACK", "report", "require", "run_checks"]

"""The registry's agent model (MLflow ``ResponsesAgent``): registered, loaded, predicted, served.

Real MLflow store (sqlite in tmp), a real tiny random transformers checkpoint, real milvus-lite and
embedder behind the agent's memory tools. A random-weight policy cannot be expected to call a
tool, so the tool-call checks run the served agent with the scripted policy
(``AGEMEM_CHAT__POLICY=scripted``, the way a deployment names another policy).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agemem.memory.process import free_port
from agemem.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
URI = "models:/agemem-policy@champion"


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A tiny random checkpoint registered and crowned; MLFLOW_TRACKING_URI points at its store."""
    from agemem import tracking
    from agemem.train.models import materialise_tiny_model

    settings = load_settings("smoke", {"runs_dir": str(tmp_path / "train"),
                                       "tracking": {"crown_random_weights": True},
                                       "train": {"tiny_hidden_size": 32, "tiny_num_layers": 1},
                                       "episode": {"max_turn_tokens": 8}})
    model_dir = materialise_tiny_model(settings, tmp_path / "model")
    from agemem.tracking.runs import configure, stage_run

    configure(settings)
    with stage_run(settings, None, "register") as run_id:
        reg = tracking.register_model(settings, adapter_dir=None, model_dir=model_dir, metrics={"judge_score": 0.1},
                                      run_id=run_id)
    assert "champion" in reg.aliases
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    monkeypatch.setenv("AGEMEM_RUNS_DIR", str(tmp_path / "serve"))  # where the served agent keeps its memory
    return settings


def _items(out: dict, kind: str) -> list[dict]:
    return [item for item in out["output"] if item["type"] == kind]


def _reply(out: dict) -> str:
    return _items(out, "message")[-1]["content"][0]["text"]


def test_the_registered_model_is_the_memory_agent(registered: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    info = mlflow.models.get_model_info(URI)
    assert info.signature is not None and "input" in info.signature.inputs.input_names()
    model = mlflow.pyfunc.load_model(URI)

    described = json.loads(_reply(model.predict({"input": [{"role": "user", "content": "?"}],
                                                 "custom_inputs": {"mode": "describe"}})))
    assert described["policy"] == "checkpoint" and described["max_context_tokens"] == 4096
    # Plain text generation: the logged weights, no system prompt, no tools.
    generated = model.predict({"input": [{"role": "user", "content": "hi"}],
                               "custom_inputs": {"mode": "generate", "max_new_tokens": 2}})
    assert generated["custom_outputs"]["mode"] == "generate" and isinstance(_reply(generated), str)
    # The agent: the episode engine's turn over the logged checkpoint (random weights: no answer expected).
    turn = model.predict({"input": [{"role": "user", "content": "hello"}]})
    assert turn["custom_outputs"]["policy"].endswith("[RANDOM WEIGHTS]")
    assert turn["custom_outputs"]["end"] in ("round_limit", "answer", "threshold") and _reply(turn)
    with pytest.raises(Exception, match="last input message must be the user's"):
        model.predict({"input": [{"role": "assistant", "content": "hello"}]})

    monkeypatch.setenv("AGEMEM_CHAT__POLICY", "scripted")
    scripted = mlflow.pyfunc.load_model(URI)
    stored = scripted.predict({"input": [{"role": "user", "content": "Remember that my cat is called Tomasz"}],
                               "custom_inputs": {"space": "alice"}})
    (call,), (result,) = _items(stored, "function_call"), _items(stored, "function_call_output")
    assert call["name"] == "Add_memory" and "Tomasz" in json.loads(call["arguments"])["content"]
    assert result["call_id"] == call["call_id"] and "memory added" in result["output"]
    # A later request (history included) retrieves it from the space's long-term memory.
    asked = scripted.predict({"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                        {"role": "user", "content": "what is my cat called?"}],
                              "context": {"conversation_id": "c1", "user_id": "alice"}})
    assert [c["name"] for c in _items(asked, "function_call")] == ["Retrieve_memory"] and "Tomasz" in _reply(asked)
    assert asked["custom_outputs"]["space"] == "alice"


def test_chat_with_the_registered_model(registered: Settings, tmp_path: Path) -> None:
    """`agemem chat --model models:/agemem-policy@champion` (and any alias) plays the registered checkpoint."""
    from typer.testing import CliRunner

    from agemem.cli import app

    for uri in (URI, "models:/agemem-policy@candidate"):
        res = CliRunner().invoke(app, ["chat", "--set", f"runs_dir={tmp_path / 'chat'}", "--set", "train.device=cpu",
                                       "--set", "episode.max_turn_tokens=8", "--set", "chat.max_rounds=1",
                                       "--model", uri, "--show-tools", "-m", "hello"])
        assert res.exit_code == 0, res.output
        assert "agent> " in res.stdout and "RANDOM WEIGHTS" in res.stderr


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_chat_request_with_a_memory_tool_call(registered: Settings,
                                                                            tmp_path: Path) -> None:
    import mlflow

    # The pre-deployment check MLflow documents (in this process: env_manager="local").
    out = tmp_path / "predicted.json"
    request = {"input": [{"role": "user", "content": "Remember that the wifi password is plum-42"}]}
    os.environ["AGEMEM_CHAT__POLICY"] = "scripted"
    try:
        mlflow.models.predict(URI, input_data=request, env_manager="local", output_path=str(out))
    finally:
        os.environ.pop("AGEMEM_CHAT__POLICY", None)
    predicted = json.loads(out.read_text())
    assert [c["name"] for c in _items(predicted, "function_call")] == ["Add_memory"]

    # The server keeps its memory apart (this process holds the first store's milvus-lite file).
    # `mlflow models serve` starts `uvicorn` from PATH: the venv's bin, as in an activated venv.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AGEMEM_CHAT__POLICY": "scripted", "MLFLOW_ENABLE_TELEMETRY": "false",
           "AGEMEM_RUNS_DIR": str(tmp_path / "served"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", URI,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not come up"
            time.sleep(1)
        def chat(text: str) -> dict:
            answer = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120,
                                json={"input": [{"role": "user", "content": text}]})
            assert answer.status_code == 200, answer.text
            return answer.json()

        assert [c["name"] for c in _items(chat("Remember that the wifi password is plum-42"), "function_call")] == \
            ["Add_memory"]
        body = chat("what is the wifi password?")
        (call,) = _items(body, "function_call")
        assert call["name"] == "Retrieve_memory" and "plum-42" in _items(body, "function_call_output")[0]["output"]
        assert "plum-42" in _reply(body)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_readme_serving_block_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's "Find the model" bash block, pasted into bash in a checkout whose runs/ holds a
    registered version (only the port and ``$PWD/.venv/bin`` are substituted)."""
    import re
    import signal

    from agemem import tracking
    from agemem.tracking.runs import configure, stage_run
    from agemem.train.models import materialise_tiny_model

    settings = load_settings("smoke", {"runs_dir": str(tmp_path / "runs"),
                                       "train": {"tiny_hidden_size": 32, "tiny_num_layers": 1}})
    model_dir = materialise_tiny_model(settings, tmp_path / "model")
    configure(settings)
    with stage_run(settings, None, "register") as run_id:
        tracking.register_model(settings, adapter_dir=None, model_dir=model_dir, metrics={}, run_id=run_id)
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Find the model (MLflow)"):]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[1]
    port = str(free_port())
    block = block.replace("5001", port).replace("$PWD/.venv/bin", str(Path(sys.executable).parent))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGEMEM_", "MLFLOW_"))}
    env.update({"PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_TELEMETRY": "false", "HF_HUB_OFFLINE": "1"})
    log = tmp_path / "block.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-e", "-c", block + "\necho\n"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the backgrounded server and its uvicorn
    answer = json.loads(next(line for line in log.read_text().splitlines() if line.startswith('{"object"')))
    assert answer["custom_outputs"]["space"] == "alice" and _items(answer, "message")

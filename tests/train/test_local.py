"""The local GRPO trainer end to end on CPU: real engine, in-process milvus-lite memory, tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agemem.settings import Settings, load_settings
from agemem.train.checkpoint import latest_checkpoint
from agemem.train.local import batch_indices, output_root, train_local
from agemem.train.run import grpo_settings


def _adapter(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(step_dir / "adapter" / "adapter_model.safetensors"))


def test_batches_cycle_through_all_episodes_deterministically() -> None:
    first_epoch = batch_indices(5, 0, 5, seed=1)
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]
    assert batch_indices(5, 1, 2, seed=1) == batch_indices(5, 1, 2, seed=1)


def test_train_then_resume_continues_and_changes_parameters(
    tiny_train_settings: Settings, episodes_file: Path
) -> None:
    one = tiny_train_settings.model_copy(update={"train": tiny_train_settings.train.model_copy(update={"total_steps": 1})})
    first = train_local(one, episodes_file)
    assert first.steps == 1 and len(first.history) == 1
    root = output_root(tiny_train_settings)
    step1 = latest_checkpoint(root)
    assert step1 is not None and step1.name == "step_000001"
    before = _adapter(step1)

    # Re-run with total_steps=2: resumes from step 1 instead of starting over.
    second = train_local(tiny_train_settings, episodes_file)
    assert second.steps == 2 and len(second.history) == 2
    assert second.history[0] == first.history[0]  # step 1 restored from the checkpoint, not re-run
    step2 = latest_checkpoint(root)
    assert step2 is not None and step2.name == "step_000002"
    after = _adapter(step2)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no LoRA parameter changed during step 2"
    for metrics in second.history:
        assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["reward/mean"])
        assert metrics["train/model_tokens"] > 0
    lines = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1.0, 2.0]
    # The final step writes the merged HF model beside the adapter, labelled as random weights.
    assert (second.checkpoint_dir / "config.json").exists() and second.adapter_dir is not None
    assert json.loads((second.checkpoint_dir / "config.json").read_text())["agemem_random_weights"] is True
    assert "RANDOM WEIGHTS" in (step2 / "README.md").read_text()
    # Nothing to do when already at total_steps.
    again = train_local(tiny_train_settings, episodes_file)
    assert again.steps == 2 and latest_checkpoint(root) == step2


def test_merged_model_reproduces_the_lora_policy(tiny_train_settings: Settings, episodes_file: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one = tiny_train_settings.model_copy(update={"train": tiny_train_settings.train.model_copy(update={"total_steps": 1})})
    result = train_local(one, episodes_file)
    merged = AutoModelForCausalLM.from_pretrained(result.checkpoint_dir).eval()
    # Re-create the base (random, seeded) and apply the adapter: same logits as the merged model.
    from agemem.train.models import build_tiny_qwen2, load_tokenizer

    fresh = build_tiny_qwen2(one, load_tokenizer(one)).eval()
    lora = PeftModel.from_pretrained(fresh, str(result.adapter_dir)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, lora(input_ids=ids).logits, atol=1e-4)


def _with_train(settings: Settings, **train: object) -> Settings:
    return settings.model_copy(update={"train": settings.train.model_copy(update=train)})


def test_another_lora_rank_trains_anew_instead_of_resuming(tiny_train_settings: Settings, episodes_file: Path) -> None:
    """Issue 14.1: a rank-4 run after a rank-8 run used to resume the rank-8 checkpoint (a 190-line
    ``size mismatch`` traceback); each configuration now has its own checkpoints."""
    rank8 = train_local(_with_train(tiny_train_settings, lora_rank=8, lora_alpha=16, total_steps=1), episodes_file)
    rank4_settings = _with_train(tiny_train_settings, lora_rank=4, lora_alpha=8, total_steps=1)
    rank4 = train_local(rank4_settings, episodes_file)
    assert rank4.steps == 1 and rank4.config_hash != rank8.config_hash
    assert output_root(rank4_settings) != rank8.adapter_dir.parents[1]
    assert json.loads((rank4.adapter_dir / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((rank8.adapter_dir / "adapter_config.json").read_text())["r"] == 8


def test_a_checkpoint_folder_of_another_configuration_is_refused(
    tiny_train_settings: Settings, episodes_file: Path
) -> None:
    """The folder name is the configuration's hash; the stored configuration guards what a name
    cannot (a folder copied by hand): resuming it is refused with one line naming the fix."""
    from typer.testing import CliRunner

    from agemem.cli import app
    from agemem.train.run import CONFIG_FILE, CheckpointConfigError

    one = _with_train(tiny_train_settings, total_steps=1)
    train_local(one, episodes_file)
    stored = output_root(one) / CONFIG_FILE
    config = json.loads(stored.read_text())
    config["train"]["lora_rank"] = 16
    stored.write_text(json.dumps(config))
    two = _with_train(tiny_train_settings, total_steps=2)
    with pytest.raises(CheckpointConfigError, match=r"lora_rank 16 -> 4.*delete .* or set train\.output_dir"):
        train_local(two, episodes_file)
    # The CLI says it in one line, with no traceback.
    from tests.fixtures_pipeline import as_pairs
    from tests.fixtures_train import TINY_TRAIN

    sets = [arg for pair in as_pairs(TINY_TRAIN) + [f"runs_dir={tiny_train_settings.runs_dir}"]
            for arg in ("--set", pair)]
    result = CliRunner().invoke(app, ["train", "--backend", "local", "--episodes", str(episodes_file), *sets])
    assert result.exit_code == 2 and result.output.startswith("error: checkpoints in "), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_smoke_profile_trains_its_steps_on_cpu(runs_dir: Path, episodes_file: Path, monkeypatch) -> None:
    import time

    import typer
    from typer.testing import CliRunner

    from agemem.cli.train import train

    monkeypatch.setenv("AGEMEM_RUNS_DIR", str(runs_dir))
    app = typer.Typer()
    app.command()(train)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["--backend", "local", "--profile", "smoke", "--episodes", str(episodes_file)])
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert elapsed < 300
    # The smoke profile warm-starts first; GRPO's checkpoints belong to the run that starts from it.
    settings = grpo_settings(load_settings("smoke", {"runs_dir": str(runs_dir)}))
    latest = latest_checkpoint(output_root(settings))
    assert latest is not None and latest.name == f"step_{settings.train.total_steps:06d}"


def test_training_signals_reach_mlflow_every_step(tiny_train_settings: Settings, episodes_file: Path) -> None:
    """The metrics users of multi-turn RL watch first, per step, in the run the trainer is handed."""
    from agemem import tracking

    client = tracking.configure(tiny_train_settings)
    experiment = client.get_experiment_by_name(tiny_train_settings.tracking.experiment)
    run_id = client.create_run(experiment.experiment_id, run_name="train").info.run_id
    train_local(tiny_train_settings, episodes_file, mlflow_run_id=run_id)
    logged = client.get_run(run_id).data.metrics
    expected = ["reward/mean", "reward/task", "reward/context", "reward/memory", "reward/penalty_no_answer",
                "tools/Add_memory", "tools/Retrieve_memory", "tools/any_call_rate", "episode/parse_failure_rate",
                "episode/answered_rate", "episode/response_tokens", "train/entropy", "train/kl_loss",
                "train/grad_norm", "time/step_s", "alarms/count"]
    assert [k for k in expected if k not in logged] == []
    assert len(client.get_metric_history(run_id, "train/entropy")) == tiny_train_settings.train.total_steps


def test_a_run_is_reproducible_from_its_seed(tiny_train_settings: Settings, episodes_file: Path, tmp_path: Path) -> None:
    """Batched decoding interleaves the trajectories' random draws differently every time; per-trajectory
    seeds derived from train.seed make the rollouts (and so the update) the same anyway."""

    def first_step(output_dir: Path) -> dict[str, float]:
        train = tiny_train_settings.train.model_copy(update={"total_steps": 1, "output_dir": output_dir,
                                                              "rollouts_per_prompt": 3})
        return train_local(tiny_train_settings.model_copy(update={"train": train}), episodes_file).history[0]

    a, b = first_step(tmp_path / "a"), first_step(tmp_path / "b")
    for key in ("reward/mean", "tokens/model", "tokens/total", "train/loss", "train/grad_norm"):
        assert a[key] == b[key], key

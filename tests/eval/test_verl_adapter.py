"""A verl LoRA checkpoint as verl's merger writes it (base weights + tokenizer, ``lora_adapter/`` with an
adapter_config.json that names no base) is evaluated as the adapter over those base weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agemem.eval.policies import load_checkpoint_model
from agemem.settings import load_settings
from agemem.train.models import materialise_tiny_model
from agemem.train.verl.merge import record_adapter_base


def write_verl_merge(settings, target: Path) -> tuple[Path, torch.nn.Module]:
    """verl's merger layout: the base model saved to ``target``, the LoRA weights and config in lora_adapter/."""
    import peft
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    materialise_tiny_model(settings, target)  # base weights + tokenizer, as the merger saves them
    torch.manual_seed(1)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(str(target)),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(trained).items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).to_dict()  # no base recorded
    config["peft_type"] = config["peft_type"].value
    config["task_type"] = None
    config["target_modules"] = list(config["target_modules"])
    adapter = target / "lora_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=4))
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    return adapter, trained.eval()


@pytest.mark.parametrize("recorded", [False, True])
def test_eval_loads_the_adapter_over_the_merged_base(runs_dir: Path, recorded: bool) -> None:
    tiny = load_settings("smoke", {"runs_dir": str(runs_dir), "train": {"tiny_hidden_size": 32, "tiny_num_layers": 1}})
    adapter, trained = write_verl_merge(tiny, runs_dir / "merged-global_step_2")
    # The pipeline trained a hub model; this machine is offline and has only the merge directory.
    paper = load_settings("paper", {"runs_dir": str(runs_dir), "train": {"model": "Qwen/Qwen2.5-7B-Instruct"}})
    if recorded:
        record_adapter_base(adapter, paper.train.model)  # what train_verl writes after the merge
    model, tokenizer = load_checkpoint_model(paper, adapter, "cpu")
    assert type(model).__name__ == "PeftModelForCausalLM" or type(model).__name__ == "PeftModel"
    ids = torch.tensor([tokenizer.encode("Who directed Ed Wood?")])
    with torch.no_grad():
        got = model(ids).logits
        expected = trained(ids).logits
        with trained.disable_adapter():
            bare = trained(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)  # the trained policy ...
    assert not torch.allclose(got, bare, atol=1e-3)  # ... not the untrained base

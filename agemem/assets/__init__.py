"""Files the project ships: the HotpotQA sample and the Qwen2.5 tokenizer (see their NOTICE.md)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
SAMPLE_DATA = ASSETS_DIR / "hotpotqa" / "hotpot_dev_distractor_sample.json"
TOKENIZER_DIR = ASSETS_DIR / "qwen2.5-tokenizer"

"""verl configuration and launch, checkpoint conversion, and the local GRPO trainer."""

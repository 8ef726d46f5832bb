"""sft: TRL SFTTrainer on the generated dialogues, loss on every assistant turn."""

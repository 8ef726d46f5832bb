"""TRL plumbing shared by the sft and dpo stages: devices, models, templates, configs, checkpoints, launch."""

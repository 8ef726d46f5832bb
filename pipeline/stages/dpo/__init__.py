"""dpo (dDPO): TRL DPOTrainer with the SFT model as reference."""

"""generate (dSFT data): teacher-simulated dialogues, self-instruct, filters, decontamination."""

"""evaluate: judge grading, win rate against a baseline, ground truth where a checker exists."""

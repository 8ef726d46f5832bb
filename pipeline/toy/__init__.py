"""The offline toy world: a synthetic task, a rule-based teacher server and a tiny student."""

"""The arithmetic toy world: an offline task with a ground-truth checker and a rule-based teacher."""

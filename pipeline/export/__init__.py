"""Export: a run's data as one `datasets.DatasetDict` with the field's split names and a dataset card."""

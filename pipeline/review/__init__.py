"""Review before DPO (`feedback.review`): a person marks a seeded sample of a round's pairs agree, swap or drop;
dpo trains on the reviewed pairs and the report sets the person against the judge. No Prefect here: the flow's
pause form (flows/review.py) and the file form (`distill review`) both record through this package."""

"""The optimizer: proposal strategies (one class per module in `strategies/`), the parts a
candidate is composed from, the clean-up of what an optimizer LLM writes, the selection of
candidates, and the bandit over strategies. No Dagster here."""

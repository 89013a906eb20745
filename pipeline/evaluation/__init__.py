"""The evaluation: per-block error (isolated and accumulated), chains, output metrics and their typed results."""

"""The engine: a recipe becomes a plan, the runner runs it into a run folder, steps are cached by content.

Also the model sources (step 00), the glue between models on disk and the
evaluation (`comparison`) and the benchmark runner (`pipeline bench`).
"""

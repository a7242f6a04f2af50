"""Recipes: each a short composition of tfl.job (data, model, plan, run directory, trainer) that says what it
trains. finetune: two-stage or gradual unfreezing; compare: scratch vs linear probe vs fine-tuning arms."""

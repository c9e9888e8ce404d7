"""Applying and judging a model: sliding-window inference, metrics in mm (the one Dice), scoring
a model on a case set, summaries with confidence intervals, the registry gate."""

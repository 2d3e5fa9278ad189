"""Evaluation: the exact, distributed evaluator (``evaluator``), model selection — best checkpoints and early
stopping (``selection``) — and evaluation of saved weights outside training (``job``)."""

"""Evaluation: graders shared with RL (``graders.py``), JSONL benchmarks, thinking-budget sweeps,
reports and plots. The command line is ``tools/evaluate.py``; see docs/EVALUATION.md."""

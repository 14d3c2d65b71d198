"""Command-line tools (installed as console scripts by setup.py: bluelm-preprocess, bluelm-convert, ...)."""

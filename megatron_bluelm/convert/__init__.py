"""HF <-> megatron conversion: declarative mapping tables (``mapping.py`` engine, one module per HF
architecture, e.g. ``llama.py``) and the two directions in ``convert.api``; CLI: tools/convert_checkpoint.py."""

"""megatron_bluelm: training codebase for BlueLM-2.5-3B-style models on megatron-core."""
import warnings

# megatron-core warns at import when Transformer Engine / apex are absent. Our backends choose
# explicitly (models/spec.py) and say which one runs, so these warnings are noise here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine is not installed.*")

__version__ = "0.1.0"

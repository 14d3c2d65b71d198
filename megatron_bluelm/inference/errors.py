"""Errors of generation requests: bad lengths, budgets, checkpoints that do not fit the tokenizer."""
from megatron_bluelm.config.errors import ConfigError


class GenerationError(ConfigError):
    """A generation request or its model/tokenizer cannot work; the message names the setting."""

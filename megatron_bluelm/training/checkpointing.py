"""Checkpoint save / resume hooks of the training loop (implemented with the checkpoint issue)."""
from megatron_bluelm.config.errors import ConfigError


class Checkpointer:
    def __init__(self, run):
        c = run.cfg.checkpoint
        if c.save or c.load:
            raise ConfigError("checkpoint.save / checkpoint.load: not available in this build yet")

    def maybe_resume(self):
        pass

    def on_step_end(self, run):
        pass

    def finish(self):
        pass

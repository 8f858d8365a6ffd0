"""engramlib: the helper library of the course "In Search of the Engram".

Where does a language model keep a memory, and can we edit it? The modules follow the course:
`memory` (toy associative memories), `facts` and `tinyworld` (the offline model and its facts),
`models` (loading GPT-2 or TinyWorld), `hooks`, `lens`, `tracing`, `rome`, `memit` (many edits at
once and in sequence), `evaluate`, `graft`, `plots`,
`checks` (exercise checks), `cli` (the `engram` command).
"""
__version__ = "0.1.0"

from engramlib.settings import Settings, cache_on_drive, setup  # noqa: E402


def load_model(name=None, device=None):
    """Load a model by name (see `engramlib.models.load_model`)."""
    from engramlib.models import load_model as _load_model
    return _load_model(name, device=device)


__all__ = ["__version__", "Settings", "setup", "cache_on_drive", "load_model"]

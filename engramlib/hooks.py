"""Record and patch what modules compute, by module name (in the spirit of baukit's nethook).

    with Trace(model, "transformer.h.3.mlp") as t:      # record an output
        model(**inputs)
    t.output                                            # [batch, tokens, d_model]

    def add_one(output, name):                          # patch an output
        return output + 1
    with TraceDict(model, ["transformer.h.3", "transformer.h.4"], edit_output=add_one):
        model(**inputs)

GPT-2 blocks return a tensor in transformers >= 5 and a tuple (hidden, ...) before; attention
modules return (output, weights). Hooks here always see and return the hidden-state tensor and
put it back in the same container.
"""
from __future__ import annotations

import contextlib

import torch


def hidden_of(output):
    """The hidden-state tensor inside a module output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """`output` with its hidden-state tensor replaced by `hidden` (same container type)."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


class StopForward(Exception):
    """Raised by a `Trace(..., stop=True)` after its module ran, to skip the rest of the model."""


class Trace(contextlib.AbstractContextManager):
    """Hook one module: keep its input/output (`retain_output`, `retain_input`) and optionally
    replace its output by `edit_output(hidden, name) -> hidden`. Removed on exit.

    stop=True ends the forward pass right after this module (nothing above it is computed; the
    `with` block swallows the `StopForward`), when only this module's input/output is needed."""

    def __init__(self, model: torch.nn.Module, name: str, retain_output: bool = True,
                 retain_input: bool = False, edit_output=None, detach: bool = True,
                 stop: bool = False):
        self.name, self.output, self.input = name, None, None
        module = model.get_submodule(name)

        def hook(mod, inputs, output):
            if retain_input:
                self.input = inputs[0].detach() if detach else inputs[0]
            if edit_output is not None:
                output = with_hidden(output, edit_output(hidden_of(output), name))
            if retain_output:
                h = hidden_of(output)
                self.output = h.detach() if detach else h
            if stop:
                raise StopForward(name)
            return output

        self.handle = module.register_forward_hook(hook)

    def close(self):
        self.handle.remove()

    def __exit__(self, exc_type, *exc):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(dict, contextlib.AbstractContextManager):
    """Several `Trace`s at once, as a dict {module name: Trace}."""

    def __init__(self, model: torch.nn.Module, names, **kwargs):
        super().__init__()
        try:
            for name in names:
                self[name] = Trace(model, name, **kwargs)
        except Exception:
            self.close()
            raise

    def close(self):
        for t in self.values():
            t.close()

    def __exit__(self, exc_type, *exc):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

"""Trained methods, one readable module each, and their registry.

A method module defines
- a :class:`~vocaseg.dense.DenseModel` subclass registered with :func:`register_method`: the trained
  model at inference time, rebuilt from a run folder by its ``from_run(info, loaded_clip)``;
- a training recipe (:class:`~vocaseg.training.loop.Recipe`) and a ``train(...)`` entry point that
  ``vocaseg train NAME`` calls;
- its presets: the papers' schedules for real datasets, and the toy recipe for the synthetic world.

The training-free rules (maskclip, raw, sclip, clearclip, naclip) are not here: they are the last-
block rules of ``backbone.py`` behind :class:`~vocaseg.dense.TrainingFreeModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..dense import DenseModel


@dataclass(frozen=True)
class MethodEntry:
    name: str
    summary: str
    model: type[DenseModel]
    train: str  # the command that trains it


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, summary: str, train: str | None = None):
    """Class decorator: register a DenseModel subclass as trained method ``name`` (fails on duplicates);
    ``train``: the command that trains it (default ``vocaseg train NAME``)."""

    def wrap(cls: type[DenseModel]) -> type[DenseModel]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].model.__qualname__}, "
                             f"{cls.__qualname__})")
        cls.name = name
        METHODS[name] = MethodEntry(name, summary, cls, train or f"vocaseg train {name}")
        return cls

    return wrap


def get_method(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"unknown trained method {name!r}; this vocaseg has {', '.join(METHODS) or 'none'}")
    return METHODS[name]


def config_from(config_cls, presets: dict, preset: str | None, overrides: dict, what: str, base: dict | None = None):
    """A method's config: its defaults <- ``base`` <- the preset's values <- ``overrides`` (None values are
    skipped, so unset command-line options keep the preset's); unknown presets and option names fail."""
    values = dict(base or {})
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r} for {what}; choose one of {', '.join(presets)}")
        values.update(presets[preset])
        values["preset"] = preset
    unknown = set(overrides) - {f.name for f in fields(config_cls)}
    if unknown:
        raise TypeError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_cls(**values)


from . import clip_rc, clipteacher, maskclip_plus, reclip, segclip  # noqa: E402,F401  (register themselves)

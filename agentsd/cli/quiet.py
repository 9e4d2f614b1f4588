"""Keeping the libraries' own output from burying agentsd's messages: what diffusers, transformers
and the hub client log (and the Python warnings raised) while a model loads is shown only if it
loads; the warning diffusers gives for a scheduler built from another scheduler class's config is
dropped."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _library_loggers() -> list[logging.Logger]:
    """The root loggers of diffusers, transformers and huggingface_hub, each configured (its own
    handler added) by its library first, so the block below does not catch the configuration."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    return [module.get_logger() for module in (diffusers_logging, transformers_logging, hub_logging)]


@contextmanager
def held_library_output() -> Iterator[None]:
    """Hold what diffusers, transformers and huggingface_hub log inside the block, and the Python
    warnings raised there: shown when the block ends, dropped when it raises. A hub model that
    cannot be loaded then gets agentsd's one-line error alone, not the hub client's retries,
    fallbacks and deprecation warnings before it."""
    held = _Held()
    loggers = _library_loggers()
    saved = [(logger, logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [held], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
    for record in held.records:
        logging.getLogger(record.name).handle(record)
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


@contextmanager
def no_config_warning() -> Iterator[None]:
    """Drop diffusers' warning that config attributes "are not expected and will be ignored" inside
    the block: building a scheduler from another scheduler class's config (a model's own
    FlowMatchEuler config for FlowMatchHeun) leaves the other class's attributes out on purpose."""
    logger = logging.getLogger("diffusers.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

"""Errors a user can cause. The CLI prints their message alone, without a stack trace."""


class LdcqError(Exception):
    """Base class: the message names the input at fault and how to fix it."""


class DatasetError(LdcqError):
    """A dataset id that cannot be resolved, or a dataset whose contents cannot be used."""


class ConfigError(LdcqError):
    """A configuration key or value that is not valid."""

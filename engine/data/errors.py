"""The one error type of the data layer.

Every problem with the user's data (a malformed line, a missing field, an empty file, an index
that does not match its data file, a tokenizer too large for the model) is raised as a
`DataError` whose message is one sentence naming the file and, where there is one, the line.
It subclasses ValueError so callers that already catch bad values keep working.
"""


class DataError(ValueError):
    """Bad input data, described in one sentence."""

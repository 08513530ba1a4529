"""The error the app shows a visitor: a request it refuses, with a readable reason."""


class RequestError(ValueError):
    """A request the app refuses, with a message for the person who sent it."""

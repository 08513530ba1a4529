"""The error the app shows a visitor: a request it refuses, with a readable reason."""


class RequestError(ValueError):
    """A request the app refuses, with a message for the person who sent it."""


class TimeLimitReached(RuntimeError):
    """Raised between tokens (generation's `stop`) or between image batches once the request's time limit passed."""

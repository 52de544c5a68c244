"""Log-once registry of why a fast path was not taken (shown by ``dsclora info``)."""
import logging
import warnings

logger = logging.getLogger("dsclora")

#: key -> reason, for every fallback that happened in this process.
FALLBACKS: dict[str, str] = {}


def fallback(key: str, reason: str) -> None:
    """Record that ``key`` (e.g. ``"affinity:cpu"``) runs a slower path and why; warn once."""
    if key in FALLBACKS:
        return
    FALLBACKS[key] = reason
    message = f"dsclora: {key} uses a slower path: {reason}"
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)

"""The verl release this plugin is written against, and the gate that refuses any other (a leaf module)."""

from __future__ import annotations

SUPPORTED_VERL_VERSIONS = ("0.9.1",)


class VerlVersionError(RuntimeError):
    pass


def check_verl_version() -> str:
    """The installed verl's version; raises VerlVersionError (with the fix) for an untested release."""
    import verl

    version = getattr(verl, "__version__", "unknown")
    if version not in SUPPORTED_VERL_VERSIONS:
        raise VerlVersionError(
            f"verl-eopd supports verl {', '.join(SUPPORTED_VERL_VERSIONS)} but verl {version} is installed; the EOPD "
            f"loss is NOT registered (it relies on verl's private loss/engine contracts). Fix: pip install "
            f"verl=={SUPPORTED_VERL_VERSIONS[-1]}, or VERL_USE_EXTERNAL_PLUGINS=none to run verl without EOPD."
        )
    return version

"""The engine plugins' version pins: which version of an engine is installed, and the message for another one."""

from __future__ import annotations

from typing import Optional, Sequence


def installed_version(dist: str) -> Optional[str]:
    """The installed distribution's version (package metadata; the package itself is not imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def pin_message(what: str, dist: str, supported: Sequence[str], found: Optional[str], otherwise: str) -> str:
    """``lora_kernels' <what> supports <dist> <versions> only; found <found> (pip install ..., or <otherwise>)``."""
    return (f"lora_kernels' {what} supports {dist} {' / '.join(supported)} only; found {found or 'no ' + dist} "
            f"(pip install {dist}=={supported[-1]}, or {otherwise})")

"""The error for a configuration that cannot work on this machine, said in words a user can act on.

A leaf module (it imports nothing of sd35): loading, the memory policy and the
LoRA adapters all raise it, and none of them has to import another for it.
"""

from __future__ import annotations


class LoadRefusedError(RuntimeError):
    """The configuration cannot work on this machine; the message says why and what to do."""

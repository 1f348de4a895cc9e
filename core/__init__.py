"""commhub's core: the envelope, the bus, the router, the recorder and the hub.

Plugins mark their hook implementations with :data:`hookimpl`::

    from commhub.core import hookimpl

    @hookimpl
    def register_channels(register):
        register(MyChannel)
"""

from commhub.core.hookspecs import hookimpl

__all__ = ["hookimpl"]

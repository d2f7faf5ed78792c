"""Client and server as separate roles that exchange messages.

:mod:`~gfmfr_secure.roles.messages` defines what crosses the boundary,
:mod:`~gfmfr_secure.roles.client` the clients one machine hosts,
:mod:`~gfmfr_secure.roles.server` the server round, :mod:`~gfmfr_secure.roles.transport`
the interface between them and :mod:`~gfmfr_secure.roles.inprocess` the in-process engine.
Importing this package imports no role.
"""

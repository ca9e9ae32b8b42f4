"""The HTTP API's routes, one module per OpenAPI tag, each a thin shell over :class:`~weightbank.ModelService`.

Every module has one ``add_routes(app, service, ...)`` that adds its routes to
the app (straight onto it, so the app's route list is flat: the ``Allow`` header
of a 405 lists every method of a path); :func:`~weightbank.http.create_app`
calls them in this order: serving, models, tags, routes, operations. ``manage`` is the dependency list that guards
the management routes (the token check, and the bearer scheme for OpenAPI).
"""

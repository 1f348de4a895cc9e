"""Records: everything on the bus, in DuckDB, and SQL over it.

* :mod:`.recorder`: the durable consumer that writes every record, idempotently;
* :mod:`.rows`: records to table rows (pure);
* :mod:`.schema`: the DuckDB schema, its views and migrations;
* :mod:`.rebuild` and :mod:`.export`: ``commhub rebuild`` and ``commhub export``;
* :mod:`.progress`: progress lines for long catch-ups;
* the SQL sandbox, its bus API, its clients and output formats;
* :mod:`.dashboard`: the ``/dashboard`` page and SQL over HTTP.
"""

"""What a sweep leaves to read: its summary, report, tables and figures.

Imports point one way, down: ``sweep`` (reading the jobs, writing the files, the Hydra callback)
uses ``documents`` (``summary.md`` and ``report.md`` from one list of sections), which with
``stages``, ``architectures``, ``cost``, ``plots``, ``depth``, ``scratch`` (the similarity-driven arm
against scratch) and ``study`` (does the similarity rule pick the right depth, over source → target
pairs) rests on ``stats``.
``python -m simfreeze.reports <sweep dir>`` summarises a sweep directory again by hand.
"""

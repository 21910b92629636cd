"""Entry points: argument parsing and calls, nothing else.

``rededit-data`` (:mod:`.data` and its ``data_*`` subcommands), ``rededit-eval`` (:mod:`.eval`), ``rededit-edit``
(:mod:`.edit`) and ``rededit-consolidate`` (:mod:`.consolidate`); ``rededit-train`` is :mod:`rededit.train`.

May import: every layer (it is the top one).
"""

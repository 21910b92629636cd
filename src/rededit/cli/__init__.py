"""Entry points: argument parsing and calls, nothing else.

``rededit-train`` (:mod:`.train`, over :mod:`rededit.train`), ``rededit-data`` (:mod:`.data` and its ``data_*``
subcommands), ``rededit-eval`` (:mod:`.eval`), ``rededit-edit`` (:mod:`.edit`) and ``rededit-consolidate``
(:mod:`.consolidate`).

May import: every layer (it is the top one).
"""

"""``distnet report``: what a run did (``summary`` for the terminal, ``page`` for
``RUN_DIR/report.html``, ``plots`` for its pictures) and how several runs compare
(``compare``).

The ``distnet`` command imports this package as the ``report`` subcommand module: its
``add_arguments`` and ``run`` are ``summary``'s.
"""

from distnet.train.report.summary import add_arguments, format_report, load_report, run

__all__ = ["add_arguments", "format_report", "load_report", "run"]

"""Maintainer tooling: execute and stamp the notebooks (``make run``), render the book (``make html``)."""

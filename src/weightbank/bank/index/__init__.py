"""The catalog index: what lets a call cost the work it asks for, not the bank's history.

See :mod:`.view` for how a reader gets a consistent picture, :mod:`.compact`
for how snapshots are made, and :mod:`weightbank.bank.catalog` for how the
bank uses both (and falls back to listing manifests when the index cannot be
trusted).
"""

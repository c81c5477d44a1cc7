"""Promotion (launch/promote.py): a candidate model gated on its evaluation against the model now serving, the promotion record, rollback."""

"""The one-command demo: online DLRM training served fresh in three data centres."""

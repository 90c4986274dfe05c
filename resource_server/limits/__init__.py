"""Limits and budgets: which apply to a request (policy), and their counters, kept atomically (stores)."""

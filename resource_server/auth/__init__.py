"""Authentication: an ordered chain of authenticators turns a bearer string into a Principal."""

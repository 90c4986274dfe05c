"""The request pipeline of the inference routes: its stages in order are in `run.py`, one module each."""
